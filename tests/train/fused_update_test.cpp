// fused_backward_pass (include/sdtrain/train/update.h, docs/memory.md): each parameter stepped
// from its post-accumulate-grad hook. On a small two-branch model: ten fused steps give the
// same bits as ten unfused ones (AdamW and 8-bit AdamW; no clipping, fp32), no gradient
// survives the backward pass, an overflow under loss scaling skips exactly the tensors it hit,
// an inf without loss scaling ends the run, and the hooks go with the policy.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/util/error.h"
#include "update_support.h"

namespace sdtrain::train {
namespace {

class FusedEqualsUnfused : public ::testing::TestWithParam<std::string> {};

TEST_P(FusedEqualsUnfused, TenStepsGiveTheSameBitsAndNoGradientSurvivesBackward) {
  ToyRun fused(GetParam(), true, false);
  ToyRun unfused(GetParam(), false, false);
  for (int64_t step = 0; step < 10; ++step) {
    fused.backward(step);
    for (const auto& parameter : fused.trained->parameters())
      ASSERT_FALSE(parameter.grad().defined()) << "a gradient survived the backward pass";
    fused.update->apply(step);
    const UpdateResult fused_result = *fused.update->settle();
    const UpdateResult unfused_result = unfused.step(step);
    EXPECT_FALSE(fused_result.skipped);
    // The reported norm is the same 2-norm of per-tensor norms, summed in another order.
    EXPECT_NEAR(fused_result.grad_norm, unfused_result.grad_norm, 1e-5 * unfused_result.grad_norm);
  }
  const auto a = fused.trained->named_parameters();
  const auto b = unfused.trained->named_parameters();
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
    EXPECT_EQ(fused.update->optimizer().step_count(i), 10) << a[i].first;
  }
}

INSTANTIATE_TEST_SUITE_P(Optimizers, FusedEqualsUnfused, ::testing::Values("adamw", "adamw8bit"));

class FusedOverflow : public ::testing::TestWithParam<std::string> {};

TEST_P(FusedOverflow, SkipsOnlyTheOverflowedTensorsAndBacksTheScaleOff) {
  ToyRun run(GetParam(), true, /*loss_scaling=*/true);
  run.step(0);
  const auto before = run.trained->named_parameters();
  std::vector<torch::Tensor> saved;
  for (const auto& [name, parameter] : before) saved.push_back(parameter.clone());
  const double scale = run.scaler.scale_value();
  const UpdateResult result = run.step(1, std::numeric_limits<double>::infinity());
  EXPECT_TRUE(result.skipped);
  EXPECT_EQ(run.scaler.scale_value(), scale * 0.5);
  for (size_t i = 0; i < before.size(); ++i) {
    const bool unchanged = torch::equal(before[i].second, saved[i]);
    // b1.weight's gradient is x * inf; b1.bias's gradient does not see the factor.
    if (before[i].first == "unet.b1.weight") {
      EXPECT_TRUE(unchanged) << before[i].first << " overflowed but was stepped";
      EXPECT_EQ(run.update->optimizer().step_count(i), 1) << before[i].first;
    } else if (before[i].first.starts_with("unet.a")) {
      EXPECT_FALSE(unchanged) << before[i].first << " had a finite gradient but was not stepped";
      EXPECT_EQ(run.update->optimizer().step_count(i), 2) << before[i].first;
    }
  }
  // The next clean step goes on from there.
  EXPECT_FALSE(run.step(2).skipped);
}

INSTANTIATE_TEST_SUITE_P(Optimizers, FusedOverflow, ::testing::Values("adamw", "adamw8bit"));

TEST(FusedBackwardUpdate, AnInfGradientWithoutLossScalingEndsTheRunAsDiverged) {
  ToyRun run("adamw", true, false);
  run.step(0);
  try {
    run.step(1, std::numeric_limits<double>::infinity());
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ExitCode::training_diverged);
    EXPECT_NE(std::string(error.what()).find("inf/NaN at step 2"), std::string::npos)
        << error.what();
  }
}

TEST(FusedBackwardUpdate, ClipsEachTensorByItsOwnNorm) {
  ToyRun run("adamw", true, false, /*max_grad_norm=*/1e-3);
  ToyRun reference("adamw", false, false, /*max_grad_norm=*/0);
  // Reference: the same gradients clipped tensor by tensor by hand, then the unfused step.
  torch::manual_seed(100);
  const torch::Tensor x = torch::randn({4, 64});
  reference.update->begin_step(0);
  reference.model->forward(x).backward();
  for (const auto& parameter : reference.trained->parameters()) {
    torch::Tensor grad = parameter.grad();
    const torch::Tensor norm =
        torch::linalg_vector_norm(grad, 2, c10::nullopt, false, c10::nullopt);
    grad.mul_(torch::clamp_max(1e-3 / (norm + 1e-6), 1.0));
  }
  reference.update->apply(0);
  reference.update->settle();
  run.step(0);
  const auto a = run.trained->named_parameters();
  const auto b = reference.trained->named_parameters();
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_TRUE(torch::equal(a[i].second, b[i].second)) << a[i].first;
}

// The capture's warm-up and check (micro_batch_pass.h): a dry backward pass steps nothing and
// counts nothing, yet records each gradient's norm, which the fingerprint gives as its squared
// norm (the unfused policy's: its gradient's sum and sum of squares); clearing the pass's
// figures leaves the next step as it would have been.
TEST(FusedBackwardUpdate, ADryPassStepsNothingAndRecordsTheNorms) {
  for (const std::string optimizer : {"adamw", "adamw8bit"}) {
    ToyRun dry(optimizer, true, true);
    ToyRun unfused(optimizer, false, true);
    const std::vector<torch::Tensor> before = dry.weights();
    dry.update->set_dry(true);
    dry.backward(0);
    dry.update->set_dry(false);
    unfused.backward(0);
    const auto after = dry.weights();
    for (size_t i = 0; i < before.size(); ++i) {
      EXPECT_TRUE(torch::equal(before[i], after[i])) << optimizer << " tensor " << i;
      EXPECT_EQ(dry.update->optimizer().step_count(i), 0) << optimizer;
    }
    // Both passes saw the same scaled gradients; the fused hook unscaled them first.
    const torch::Tensor squares = dry.update->gradient_fingerprint().select(1, 1);
    const torch::Tensor scale = unfused.scaler.scale_snapshot().to(torch::kDouble);
    const torch::Tensor expected =
        unfused.update->gradient_fingerprint().select(1, 1) / scale.square();
    EXPECT_TRUE(torch::allclose(squares, expected, 1e-5)) << optimizer << squares << expected;
    EXPECT_TRUE(torch::all(dry.update->gradient_fingerprint().select(1, 0) == 0).item<bool>());

    dry.update->clear_pass_figures();
    EXPECT_TRUE(torch::all(dry.update->gradient_fingerprint() == 0).item<bool>()) << optimizer;
    ToyRun reference(optimizer, true, true);
    for (int64_t step = 0; step < 2; ++step) {
      EXPECT_EQ(dry.step(step).skipped, reference.step(step).skipped);
    }
    const auto a = dry.weights();
    const auto b = reference.weights();
    for (size_t i = 0; i < a.size(); ++i) EXPECT_TRUE(torch::equal(a[i], b[i])) << optimizer;
  }
}

TEST(FusedBackwardUpdate, TheHooksGoWithThePolicy) {
  ToyRun run("adamw", true, false);
  run.update.reset();
  torch::manual_seed(1);
  run.model->forward(torch::randn({4, 64})).backward();
  for (const auto& parameter : run.trained->parameters()) EXPECT_TRUE(parameter.grad().defined());
}

}  // namespace
}  // namespace sdtrain::train
