// fp32 AdamW against LibTorch's torch::optim::AdamW, and its checkpoint round trip.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/optim/adamw.h"
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

}  // namespace
}  // namespace sdtrain::optim
