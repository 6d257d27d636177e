// fp32 AdamW against LibTorch's torch::optim::AdamW, and its checkpoint round trip.
#include "sdtrain/optim/adamw.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace sdtrain::optim {
namespace {

TEST(AdamW, MatchesTorchAdamWOverTwentySteps) {
  torch::manual_seed(21);
  OptimizerOptions options;
  options.lr = 1e-2;
  options.weight_decay = 0.05;
  torch::Tensor ours = torch::randn({33, 17}).set_requires_grad(true);
  torch::Tensor theirs = ours.detach().clone().set_requires_grad(true);
  AdamW optimizer({{"w", ours}}, options);
  torch::optim::AdamW reference(
      std::vector<torch::Tensor>{theirs},
      torch::optim::AdamWOptions(options.lr)
          .betas({options.beta1, options.beta2})
          .eps(options.eps)
          .weight_decay(options.weight_decay));
  for (int step = 0; step < 20; ++step) {
    const torch::Tensor g = torch::randn({33, 17});
    ours.mutable_grad() = g.clone();
    theirs.mutable_grad() = g.clone();
    optimizer.step();
    reference.step();
    // LibTorch's C++ AdamW uses mul + add where torch.optim uses lerp: last-bit differences.
    ASSERT_TRUE(torch::allclose(ours, theirs, 1e-5, 1e-7)) << "step " << step;
  }
  EXPECT_EQ(optimizer.step_count(0), 20);
}

TEST(AdamW, Fp16ParametersAreUpdatedThroughFp32) {
  torch::manual_seed(22);
  torch::Tensor p = torch::randn({100}).to(torch::kFloat16).set_requires_grad(true);
  const torch::Tensor before = p.detach().clone();
  AdamW optimizer({{"p", p}}, OptimizerOptions{});
  optimizer.step_parameter(0, torch::randn({100}).to(torch::kFloat16));
  EXPECT_EQ(p.scalar_type(), torch::kFloat16);
  EXPECT_EQ(optimizer.exp_avg(0).scalar_type(), torch::kFloat32);
  // First step moves every element by about lr.
  const torch::Tensor moved = (p.detach().to(torch::kFloat32) - before.to(torch::kFloat32)).abs();
  EXPECT_GT(moved.min().item<float>(), 0.5e-3f);
  EXPECT_LT(moved.max().item<float>(), 2e-3f);
}

TEST(AdamW, SaveLoadContinueEqualsUninterrupted) {
  auto run = [](AdamW& optimizer, torch::Tensor& p, int first, int count) {
    for (int s = first; s < first + count; ++s) {
      torch::manual_seed(500 + s);
      optimizer.step_parameter(0, torch::randn(p.sizes()));
    }
  };
  torch::manual_seed(23);
  const torch::Tensor init = torch::randn({10, 10});
  torch::Tensor a = init.clone().set_requires_grad(true);
  AdamW uninterrupted({{"p", a}}, OptimizerOptions{});
  run(uninterrupted, a, 0, 6);

  torch::Tensor b = init.clone().set_requires_grad(true);
  AdamW first({{"p", b}}, OptimizerOptions{});
  run(first, b, 0, 3);
  io::NamedTensors tensors;
  std::map<std::string, std::string> metadata;
  first.save_state(tensors, metadata, "opt/");
  const auto path = testing::scratch_dir() / "adamw.safetensors";
  io::save_safetensors(path, tensors, metadata);
  torch::Tensor c = b.detach().clone().set_requires_grad(true);
  AdamW resumed({{"p", c}}, OptimizerOptions{});
  resumed.load_state(io::SafetensorsFile(path), "opt/");
  run(resumed, c, 3, 3);
  EXPECT_TRUE(torch::equal(a, c));
  EXPECT_TRUE(torch::equal(uninterrupted.exp_avg_sq(0), resumed.exp_avg_sq(0)));
}

// Three parameters: a matrix, a channels-last convolution weight (its moments must walk its
// storage in step with it) and a vector that gets no gradient at every step.
struct FusedCase {
  std::vector<torch::Tensor> params;
  explicit FusedCase(uint64_t seed) {
    torch::manual_seed(seed);
    params = {torch::randn({33, 17}),
              torch::randn({8, 4, 3, 3}).contiguous(torch::MemoryFormat::ChannelsLast),
              torch::randn({40})};
    for (auto& p : params) p.set_requires_grad(true);
  }
  NamedParameters named() const {
    return {{"w", params[0]}, {"conv", params[1]}, {"b", params[2]}};
  }
  FusedCase copy() const {
    FusedCase other(0);
    for (size_t i = 0; i < params.size(); ++i)
      other.params[i] =
          params[i].detach().clone(torch::MemoryFormat::Preserve).set_requires_grad(true);
    return other;
  }
  // Step `step`'s gradients (none for the vector on odd steps), the same for every copy.
  void set_gradients(int step) {
    torch::manual_seed(900 + step);
    for (size_t i = 0; i < params.size(); ++i) {
      params[i].mutable_grad() =
          i == 2 && step % 2 == 1 ? torch::Tensor() : torch::randn(params[i].sizes()) * (i + 1);
    }
  }
};

OptimizerOptions fused_options(bool fused) {
  OptimizerOptions options;
  options.lr = 1e-2;
  options.weight_decay = 0.05;
  options.fused_kernel = fused;
  return options;
}

// torch's fused multi-tensor kernel (the GPU's default for float32 parameters) against the
// single-tensor ops, both on the CPU, with the learning rate changing each step. The moments
// are the same; the parameter's update is rounded in another order, about one ulp of the
// parameter per step (measured: at most 5e-7 relative over 20 steps), so 1e-6 relative and
// 1e-7 absolute over twelve steps.
TEST(AdamW, FusedKernelMatchesTheSingleTensorSteps) {
  FusedCase single_case(31), fused_case = single_case.copy();
  AdamW single(single_case.named(), fused_options(false));
  AdamW fused(fused_case.named(), fused_options(true));
  EXPECT_FALSE(single.uses_fused_kernel());
  EXPECT_TRUE(fused.uses_fused_kernel());
  for (int step = 0; step < 12; ++step) {
    single_case.set_gradients(step);
    fused_case.set_gradients(step);
    single.set_lr(1e-2 / (1 + step));
    fused.set_lr(1e-2 / (1 + step));
    single.step();
    fused.step();
    for (size_t i = 0; i < 3; ++i) {
      ASSERT_TRUE(torch::allclose(fused_case.params[i], single_case.params[i], 1e-6, 1e-7))
          << "parameter " << i << " step " << step;
      ASSERT_TRUE(torch::allclose(fused.exp_avg(i), single.exp_avg(i), 1e-6, 1e-12)) << i;
      ASSERT_TRUE(torch::allclose(fused.exp_avg_sq(i), single.exp_avg_sq(i), 1e-6, 1e-12)) << i;
    }
  }
  EXPECT_EQ(fused.step_count(0), 12);
  EXPECT_EQ(fused.step_count(2), 6);  // stepped only when it had a gradient
  EXPECT_EQ(fused.exp_avg(1).strides(), fused_case.params[1].strides());
}

// The skip flag is read by the kernel: with it set nothing changes, the counts advance and are
// returned for the caller to retract once it has read the flag; the next step is then the
// first one. A flag of 2 (the loss scaler's sum over two groups) skips too.
TEST(AdamW, FusedKernelSkipsOnTheFlagWithoutReadingIt) {
  FusedCase skipped_case(32), fresh_case = skipped_case.copy();
  AdamW skipped(skipped_case.named(), fused_options(true));
  AdamW fresh(fresh_case.named(), fused_options(true));
  for (const float flag : {1.0f, 2.0f}) {
    skipped_case.set_gradients(0);
    const std::vector<torch::Tensor> before = {skipped_case.params[0].detach().clone(),
                                               skipped_case.params[1].detach().clone()};
    const std::vector<size_t> counted = skipped.step_unless(torch::full({1}, flag));
    EXPECT_EQ(counted, (std::vector<size_t>{0, 1, 2})) << flag;
    EXPECT_TRUE(torch::equal(skipped_case.params[0], before[0])) << flag;
    EXPECT_TRUE(torch::equal(skipped_case.params[1], before[1])) << flag;
    EXPECT_EQ(torch::count_nonzero(skipped.exp_avg(0)).item<int64_t>(), 0) << flag;
    for (size_t index : counted) skipped.retract_step(index);
    EXPECT_EQ(skipped.step_count(0), 0);
  }
  skipped_case.set_gradients(0);
  fresh_case.set_gradients(0);
  EXPECT_EQ(skipped.step_unless(torch::zeros({1})).size(), 3u);
  fresh.step();
  for (size_t i = 0; i < 3; ++i)
    EXPECT_TRUE(torch::equal(skipped_case.params[i], fresh_case.params[i])) << i;
}

// On a GPU the fused kernel is the default for float32 parameters: against the single-tensor
// ops on the CPU, at the tolerance of the CPU comparison above (the CUDA kernel contracts to
// fused multiply-adds, another rounding of the same order). Skipped without a GPU.
TEST(AdamW, FusedCudaKernelIsTheGpuDefaultAndMatchesTheCpuSteps) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  FusedCase cpu_case(33), gpu_case = cpu_case.copy();
  for (auto& p : gpu_case.params) p = p.detach().to(torch::kCUDA).set_requires_grad(true);
  AdamW cpu(cpu_case.named(), fused_options(false));
  OptimizerOptions automatic = fused_options(false);
  automatic.fused_kernel.reset();
  AdamW gpu(gpu_case.named(), automatic);
  EXPECT_TRUE(gpu.uses_fused_kernel());
  for (int step = 0; step < 12; ++step) {
    cpu_case.set_gradients(step);
    gpu_case.set_gradients(step);
    for (auto& p : gpu_case.params)
      if (p.grad().defined()) p.mutable_grad() = p.grad().to(torch::kCUDA);
    cpu.step();
    gpu.step();
  }
  for (size_t i = 0; i < 3; ++i) {
    EXPECT_TRUE(torch::allclose(gpu_case.params[i].cpu(), cpu_case.params[i], 1e-6, 1e-7)) << i;
    EXPECT_TRUE(torch::allclose(gpu.exp_avg_sq(i).cpu(), cpu.exp_avg_sq(i), 1e-6, 1e-12)) << i;
  }
}

// The fused kernel takes float32 parameters only: asking for it with others is refused.
TEST(AdamW, FusedKernelRefusesOtherDtypes) {
  torch::Tensor half = torch::randn({4}).to(torch::kFloat16).set_requires_grad(true);
  EXPECT_THROW(AdamW({{"h", half}}, fused_options(true)), ConfigError);
  EXPECT_FALSE(AdamW({{"h", half}}, OptimizerOptions{}).uses_fused_kernel());
}

}  // namespace
}  // namespace sdtrain::optim
