// compute.attention_backend's mechanism (models/attention_backend.h) on the CPU: the preferred
// kernel goes first in SDPA's order for the scope's life and the order is restored after it,
// "math" turns the CPU's flash kernel off, a kernel the CPU lacks falls back to torch's order
// and the report says so, and each kind of call is reported once with the kernel that ran it.
// Which kernel CUDA picks for each choice is tested on a GPU (attention_backend_cuda_test.cpp).
#include "sdtrain/models/attention_backend.h"

#include <ATen/Context.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

using namespace sdtrain::models;  // NOLINT(google-build-using-namespace): the file tests it

namespace {

std::vector<at::SDPBackend> priority_order() {
  const auto order = at::globalContext().sDPPriorityOrder();
  return {order.begin(), order.end()};
}

torch::Tensor heads(int64_t head_size, int64_t length = 16) {
  return torch::randn({1, 2, length, head_size});
}

TEST(AttentionBackend, MathFirstRunsTheMathKernelAndTheScopeRestoresTheOrder) {
  forget_attention_kernels();
  const auto before = priority_order();
  const torch::Tensor q = heads(64);
  attention_kernel(q, q, q);
  {
    const PreferredAttentionBackend math(AttentionBackend::math);
    EXPECT_EQ(priority_order().front(), at::SDPBackend::math);
    EXPECT_FALSE(at::globalContext().userEnabledFlashSDP());
    attention_kernel(q, q, q);
  }
  EXPECT_EQ(priority_order(), before);
  EXPECT_TRUE(at::globalContext().userEnabledFlashSDP());
  attention_kernel(q, q, q);  // the first kind again: not reported twice
  const auto used = attention_kernels_used();
  ASSERT_EQ(used.size(), 2u);
  EXPECT_EQ(used[0].kernel, "flash");  // torch's CPU order: flash, then math
  EXPECT_EQ(used[0].preferred, AttentionBackend::automatic);
  EXPECT_EQ(used[1].kernel, "math");
  EXPECT_EQ(used[1].preferred, AttentionBackend::math);
  EXPECT_EQ(used[1].head_size, 64);
}

TEST(AttentionBackend, ScopesNestAndAutomaticChangesNothing) {
  const auto before = priority_order();
  {
    const PreferredAttentionBackend efficient(AttentionBackend::efficient);
    {
      const PreferredAttentionBackend cudnn(AttentionBackend::cudnn);
      const auto order = priority_order();
      EXPECT_EQ(order[0], at::SDPBackend::cudnn_attention);
      EXPECT_EQ(order[1], at::SDPBackend::efficient_attention);  // the rest keep their order
      EXPECT_EQ(order.size(), before.size());
    }
    EXPECT_EQ(priority_order().front(), at::SDPBackend::efficient_attention);
    const PreferredAttentionBackend automatic(AttentionBackend::automatic);
    EXPECT_EQ(priority_order().front(), at::SDPBackend::efficient_attention);
  }
  EXPECT_EQ(priority_order(), before);
}

// The CPU has no cuDNN or memory-efficient attention: the call runs on torch's CPU order
// instead of failing, and the report names the preference it could not honour.
TEST(AttentionBackend, AKernelTheDeviceLacksFallsBackAndIsReported) {
  forget_attention_kernels();
  const PreferredAttentionBackend cudnn(AttentionBackend::cudnn);
  const torch::Tensor q = heads(40);
  const torch::Tensor out = attention_kernel(q, q, q, /*is_causal=*/true);
  EXPECT_TRUE(torch::isfinite(out).all().item<bool>());
  const auto used = attention_kernels_used();
  ASSERT_EQ(used.size(), 1u);
  EXPECT_EQ(used[0].kernel, "flash");
  EXPECT_TRUE(used[0].causal);
  EXPECT_EQ(describe_attention_kernels(),
            "attention kernels: flash instead of cudnn for 40-wide heads in fp32 on the CPU, "
            "causal");
}

// The choice changes which kernel computes softmax(q k^T / sqrt(d)) v, not the function: the
// math kernel is that formula as written, the CPU's flash kernel sums it blockwise with an
// online softmax. In fp32 on the build machine (these shapes, five seeds) they differed by 6e-7
// at most in the outputs (up to 1.7) and 5.7e-6 in the gradients (up to 7.8), about 1e-6
// relative; 1e-5 relative plus 1e-5 absolute leaves an order of magnitude.
TEST(AttentionBackend, MathAndFlashAgreeWithinFp32RoundingWithGradients) {
  forget_attention_kernels();
  torch::manual_seed(0);
  const torch::Tensor q = heads(64, 77), k = heads(64, 77), v = heads(64, 77);
  std::vector<torch::Tensor> outputs, gradients;
  for (const AttentionBackend backend : {AttentionBackend::math, AttentionBackend::flash}) {
    const PreferredAttentionBackend preferred(backend);
    const torch::Tensor leaf = q.clone().requires_grad_(true);
    const torch::Tensor out = attention_kernel(leaf, k, v);
    (out * out).sum().backward();
    outputs.push_back(out.detach());
    gradients.push_back(leaf.grad());
  }
  EXPECT_TRUE(torch::allclose(outputs[0], outputs[1], 1e-5, 1e-5));
  EXPECT_TRUE(torch::allclose(gradients[0], gradients[1], 1e-5, 1e-5));
  const auto used = attention_kernels_used();
  ASSERT_EQ(used.size(), 2u);
  EXPECT_EQ(used[0].kernel, "math");
  EXPECT_EQ(used[1].kernel, "flash");
  EXPECT_TRUE(used[0].with_gradients);
  EXPECT_NE(describe_attention_kernels().find("with gradients"), std::string::npos);
}

TEST(AttentionBackend, NamesRoundTrip) {
  for (const auto& [name, backend] : attention_backend_names())
    EXPECT_EQ(attention_backend_name(backend), name);
}

}  // namespace
