// compute.attention_backend on a GPU (models/attention_backend.h): each choice runs its kernel
// where the kernel can, falls back where it cannot (flash has no heads wider than 256, the
// VAE's are 512), every kernel computes the same attention to fp16 rounding, and the kernel
// report works inside a CUDA graph capture (its question to torch is host-side only).
// Without a GPU every test here reports itself as skipped.
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/models/attention_backend.h"

using namespace sdtrain::models;  // NOLINT(google-build-using-namespace): the file tests it

namespace {

torch::Tensor cuda_heads(int64_t head_size, torch::ScalarType dtype) {
  return torch::randn({2, 4, 77, head_size}, torch::TensorOptions().device(torch::kCUDA)).to(dtype);
}

// Each choice against the fp32 math kernel on the same fp16 inputs. The outputs are weighted
// means of v (|v| < 5): fp16's spacing there is 2^-8 = 0.004 at worst, and the fused kernels
// keep the probabilities in fp16 before the product with v, another relative 2^-11 of the
// mean. 0.01 absolute holds both with room; a wrong kernel (a missing scale, a transposed
// operand) is off by O(1).
TEST(AttentionBackendOnCuda, EveryChoiceComputesTheSameAttentionToFp16Rounding) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  torch::manual_seed(0);
  const torch::Tensor q = cuda_heads(64, torch::kHalf), k = cuda_heads(64, torch::kHalf),
                      v = cuda_heads(64, torch::kHalf);
  const torch::Tensor reference = at::scaled_dot_product_attention(
      q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat));
  const bool ampere_or_newer = at::cuda::getCurrentDeviceProperties()->major >= 8;
  for (const AttentionBackend backend :
       {AttentionBackend::automatic, AttentionBackend::flash, AttentionBackend::efficient,
        AttentionBackend::cudnn, AttentionBackend::math}) {
    forget_attention_kernels();
    const PreferredAttentionBackend preferred(backend);
    const torch::Tensor out = attention_kernel(q, k, v);
    const auto used = attention_kernels_used();
    ASSERT_EQ(used.size(), 1u);
    const std::string name = attention_backend_name(backend);
    SCOPED_TRACE(name + " ran on " + used[0].kernel);
    if (backend == AttentionBackend::automatic)
      EXPECT_EQ(used[0].kernel, ampere_or_newer ? "flash" : "efficient");
    else if (backend != AttentionBackend::cudnn &&
             (ampere_or_newer || backend != AttentionBackend::flash))
      EXPECT_EQ(used[0].kernel, name);
    EXPECT_LT((out.to(torch::kFloat) - reference).abs().max().item<double>(), 0.01);
  }
}

// The VAE's mid-block attention: one 512-wide head, beyond flash attention's 256.
TEST(AttentionBackendOnCuda, FlashFallsBackForTheVaesWideHeadAndSaysSo) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  forget_attention_kernels();
  const PreferredAttentionBackend flash(AttentionBackend::flash);
  const torch::Tensor q = cuda_heads(512, torch::kHalf);
  const torch::Tensor out = attention_kernel(q, q, q);
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  const auto used = attention_kernels_used();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_NE(used[0].kernel, "flash");
  EXPECT_NE(describe_attention_kernels().find("instead of flash for 512-wide heads in fp16"),
            std::string::npos)
      << describe_attention_kernels();
}

TEST(AttentionBackendOnCuda, AKindFirstSeenInsideACaptureIsReportedAndReplays) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const torch::Tensor q = cuda_heads(64, torch::kHalf);
  const torch::Tensor eager = at::scaled_dot_product_attention(q, q, q);
  at::cuda::CUDAGraph graph;
  torch::Tensor captured;
  {
    const c10::cuda::CUDAStreamGuard side(c10::cuda::getStreamFromPool());
    attention_kernel(q, q, q);  // warm-up on the capture's stream, as micro_batch_pass.cpp does
    torch::cuda::synchronize();
    forget_attention_kernels();
    graph.capture_begin();
    captured = attention_kernel(q, q, q);
    graph.capture_end();
  }
  graph.replay();
  torch::cuda::synchronize();
  ASSERT_EQ(attention_kernels_used().size(), 1u);
  EXPECT_TRUE(torch::equal(captured, eager));
}

}  // namespace
