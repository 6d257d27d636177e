// CUDA kernels of 8-bit AdamW against the CPU reference: bit-identical parameters, codes and
// absmax (both sides run the same IEEE fp32 operations; docs/optimizer.md "Bit-exactness").
// Without a GPU (or a CUDA build) every test here reports itself as skipped, with the reason.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>

#include "sdtrain/optim/adamw8bit.h"

namespace sdtrain::optim {
namespace {

#define SDTRAIN_REQUIRE_CUDA()                                                       \
  do {                                                                               \
    if (!SDTRAIN_CUDA_BUILD) GTEST_SKIP() << "built without CUDA kernels";           \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine"; \
  } while (0)

#if SDTRAIN_WITH_CUDA
constexpr bool SDTRAIN_CUDA_BUILD = true;
#else
constexpr bool SDTRAIN_CUDA_BUILD = false;
#endif

// Sizes around every boundary: partial blocks, under/over 4096 (fp32 vs 8-bit states), a lane
// with a partial group of 8, and a tensor large enough for many CTAs.
const std::vector<int64_t> kSizes{1, 7, 255, 257, 4095, 4096, 4097, 4099, 65536 + 13, 300000};

NamedParameters make_parameters(torch::ScalarType type, const torch::Device& device) {
  torch::manual_seed(31);
  NamedParameters params;
  for (const int64_t n : kSizes) {
    params.emplace_back("p" + std::to_string(n),
                        (torch::randn({n}) * 0.1).to(type).to(device).set_requires_grad(true));
  }
  // A contiguous view one element into a larger buffer: not 16-byte aligned, so the kernel
  // takes its scalar path.
  torch::Tensor buffer = (torch::randn({8193}) * 0.1).to(type).to(device);
  params.emplace_back("unaligned", buffer.narrow(0, 1, 8192).detach().set_requires_grad(true));
  return params;
}

void set_gradients(const NamedParameters& params, int step) {
  torch::manual_seed(100 + step);
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor& p = params[i].second;
    torch::Tensor g = torch::randn(p.sizes()) * 0.01;
    if (i == 2) g.zero_();  // an all-zero gradient
    if (p.numel() > 300) {   // non-finite gradient elements, in 8-bit and fp32-state tensors
      g[3] = std::numeric_limits<float>::quiet_NaN();
      g[299] = std::numeric_limits<float>::infinity();
      g[p.numel() - 1] = -std::numeric_limits<float>::infinity();
    }
    p.mutable_grad() = g.to(p.scalar_type()).to(p.device());
  }
}

void expect_bit_identical(const AdamW8bit& cpu, const AdamW8bit& gpu, int step) {
  for (size_t i = 0; i < cpu.num_parameters(); ++i) {
    const std::string& name = cpu.parameters()[i].first;
    const torch::Tensor p = gpu.parameters()[i].second.detach().cpu();
    // Compare bits, so NaN payloads or -0 cannot hide behind ==.
    const auto bits = [](const torch::Tensor& t) {
      return t.scalar_type() == torch::kFloat32 ? t.view(torch::kInt32) : t.view(torch::kInt16);
    };
    ASSERT_TRUE(torch::equal(bits(cpu.parameters()[i].second.detach()), bits(p)))
        << name << " parameter differs at step " << step;
    const auto& a = cpu.state(i);
    const auto& b = gpu.state(i);
    ASSERT_TRUE(torch::equal(a.state1, b.state1.cpu()) && torch::equal(a.state2, b.state2.cpu()))
        << name << " state differs at step " << step;
    if (a.quantized) {
      ASSERT_TRUE(torch::equal(a.absmax1, b.absmax1.cpu()) &&
                  torch::equal(a.absmax2, b.absmax2.cpu()))
          << name << " absmax differs at step " << step;
    }
  }
}

void run_equivalence(torch::ScalarType type, bool per_parameter, bool stochastic = false) {
  OptimizerOptions options;
  options.lr = 1e-3;
  options.weight_decay = 1e-2;
  options.stochastic_rounding = stochastic;
  options.rounding_seed = 0x1234567890abcdefULL;
  NamedParameters cpu_params = make_parameters(type, torch::kCPU);
  NamedParameters gpu_params = make_parameters(type, torch::kCUDA);
  AdamW8bit cpu(cpu_params, options);
  AdamW8bit gpu(gpu_params, options);
  for (int step = 0; step < 8; ++step) {
    set_gradients(cpu_params, step);
    set_gradients(gpu_params, step);
    cpu.step();
    if (per_parameter) {
      for (size_t i = 0; i < gpu.num_parameters(); ++i) gpu.step_parameter(i);
    } else {
      gpu.step();  // multi-tensor launches
    }
    expect_bit_identical(cpu, gpu, step);
  }
}

TEST(AdamW8bitCuda, BitIdenticalToReferenceFp32) {
  SDTRAIN_REQUIRE_CUDA();
  run_equivalence(torch::kFloat32, /*per_parameter=*/false);
}

TEST(AdamW8bitCuda, BitIdenticalToReferenceFp16) {
  SDTRAIN_REQUIRE_CUDA();
  run_equivalence(torch::kFloat16, false);
}

TEST(AdamW8bitCuda, BitIdenticalToReferenceBf16) {
  SDTRAIN_REQUIRE_CUDA();
  run_equivalence(torch::kBFloat16, false);
}

// Lean mode: the kernels' stochastic rounding draws the reference's bits for every element.
TEST(AdamW8bitCuda, StochasticRoundingOfBf16IsBitIdenticalToTheReference) {
  SDTRAIN_REQUIRE_CUDA();
  run_equivalence(torch::kBFloat16, false, /*stochastic=*/true);
  run_equivalence(torch::kBFloat16, /*per_parameter=*/true, /*stochastic=*/true);
}

// Fused backward under fp16: a nonzero device-side flag leaves parameter and state untouched.
TEST(AdamW8bitCuda, TheSkipFlagLeavesTheTensorUntouched) {
  SDTRAIN_REQUIRE_CUDA();
  NamedParameters params = make_parameters(torch::kFloat32, torch::kCUDA);
  AdamW8bit optimizer(params, OptimizerOptions{});
  set_gradients(params, 0);
  const auto flag = torch::ones({1}, torch::TensorOptions().dtype(torch::kFloat32).device(torch::kCUDA));
  for (size_t i = 0; i < params.size(); ++i) {
    const torch::Tensor before = params[i].second.detach().clone();
    const torch::Tensor state_before = optimizer.state(i).state1.clone();
    optimizer.step_parameter(i, params[i].second.grad(), flag);
    EXPECT_TRUE(torch::equal(before, params[i].second.detach())) << params[i].first;
    EXPECT_TRUE(torch::equal(state_before, optimizer.state(i).state1)) << params[i].first;
  }
}

// A channels-last convolution weight (compute.channels_last): the kernels walk its storage as
// the CPU reference does, bit for bit, its gradient given channels-last or NCHW.
TEST(AdamW8bitCuda, AChannelsLastParameterIsBitIdenticalToTheReference) {
  SDTRAIN_REQUIRE_CUDA();
  torch::manual_seed(5);
  const torch::Tensor start =
      (torch::randn({64, 40, 3, 3}) * 0.05).contiguous(torch::MemoryFormat::ChannelsLast);
  NamedParameters cpu_params{{"w", start.clone().set_requires_grad(true)}};
  NamedParameters gpu_params{{"w", start.to(torch::kCUDA).set_requires_grad(true)}};
  ASSERT_TRUE(gpu_params[0].second.is_contiguous(torch::MemoryFormat::ChannelsLast));
  AdamW8bit cpu(cpu_params, OptimizerOptions{});
  AdamW8bit gpu(gpu_params, OptimizerOptions{});
  for (int step = 0; step < 4; ++step) {
    const torch::Tensor g = torch::randn(start.sizes()) * 0.01;
    const torch::Tensor given = step % 2 ? g : g.contiguous(torch::MemoryFormat::ChannelsLast);
    cpu.step_parameter(0, given);
    gpu.step_parameter(0, given.to(torch::kCUDA));
    expect_bit_identical(cpu, gpu, step);
  }
}

TEST(AdamW8bitCuda, PerParameterStepsEqualTheMultiTensorStep) {
  SDTRAIN_REQUIRE_CUDA();
  run_equivalence(torch::kFloat32, /*per_parameter=*/true);
}

TEST(AdamW8bitCuda, EmptyTensorsAndMixedDtypesInOneStep) {
  SDTRAIN_REQUIRE_CUDA();
  torch::manual_seed(32);
  NamedParameters params{
      {"empty", torch::empty({0}, torch::kCUDA).set_requires_grad(true)},
      {"f32", torch::randn({5000}, torch::kCUDA).set_requires_grad(true)},
      {"bf16", torch::randn({5000}, torch::kCUDA).to(torch::kBFloat16).detach().set_requires_grad(true)}};
  AdamW8bit optimizer(params, OptimizerOptions{});
  for (auto& [name, p] : params) p.mutable_grad() = torch::ones_like(p);
  const torch::Tensor before = params[1].second.detach().clone();
  optimizer.step();
  torch::cuda::synchronize();
  EXPECT_EQ(optimizer.step_count(0), 1);
  // First step with g = 1: every element moves by lr (1 + wd-decay of p).
  const torch::Tensor moved = (before - params[1].second.detach()).cpu();
  EXPECT_TRUE(torch::allclose(moved, torch::full_like(moved, 1e-3) + before.cpu() * 1e-5, 1e-3, 1e-6));
}

}  // namespace
}  // namespace sdtrain::optim
