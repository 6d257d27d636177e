// Loss scaling follows torch.amp.GradScaler's rules (scale, unscale, skip on inf/NaN with
// backoff, growth after growth_interval clean steps) and autocast scopes nest like
// `with torch.autocast(...)`.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>

#include "sdtrain/train/mixed_precision.h"

#include <ATen/autocast_mode.h>

namespace sdtrain::train {
namespace {

// The unscale's flag read on the host: true when every gradient was finite.
bool all_finite(LossScaler& scaler, const std::vector<torch::Tensor>& gradients) {
  return scaler.unscale(gradients).item<float>() == 0.0f;
}

// A found-inf flag as the update takes it: float32 [1], nonzero on an overflow.
torch::Tensor overflow(bool found) { return torch::full({1}, found ? 1.0f : 0.0f); }

TEST(LossScaler, ScalesTheLossAndUnscalesFiniteGradients) {
  LossScaler scaler(true, torch::kCPU);
  EXPECT_EQ(scaler.scale_value(), 65536.0);
  const torch::Tensor loss = torch::tensor(0.25f);
  EXPECT_FLOAT_EQ(scaler.scale(loss).item<float>(), 0.25f * 65536.0f);
  torch::Tensor grad = torch::full({3}, 65536.0f * 2.0f);
  EXPECT_TRUE(all_finite(scaler, {grad}));
  EXPECT_TRUE(torch::equal(grad, torch::full({3}, 2.0f)));
}

TEST(LossScaler, NonFiniteGradientBacksOffAndReportsTheSkip) {
  LossScaler scaler(true, torch::kCPU);
  torch::Tensor finite = torch::ones({4});
  torch::Tensor bad = torch::tensor({1.0f, std::numeric_limits<float>::infinity()});
  EXPECT_FALSE(all_finite(scaler, {finite, bad}));
  scaler.update(overflow(true));
  EXPECT_EQ(scaler.scale_value(), 32768.0);
  torch::Tensor nan = torch::tensor({std::numeric_limits<float>::quiet_NaN()});
  EXPECT_FALSE(all_finite(scaler, {nan}));
  scaler.update(overflow(true));
  EXPECT_EQ(scaler.scale_value(), 16384.0);
}

TEST(LossScaler, GrowsAfterGrowthIntervalCleanSteps) {
  LossScalerOptions options;
  options.growth_interval = 3;
  LossScaler scaler(true, torch::kCPU, options);
  for (int step = 0; step < 2; ++step) scaler.update(overflow(false));
  EXPECT_EQ(scaler.scale_value(), 65536.0);
  EXPECT_EQ(scaler.growth_tracker(), 2);
  scaler.update(overflow(false));
  EXPECT_EQ(scaler.scale_value(), 131072.0);
  EXPECT_EQ(scaler.growth_tracker(), 0);
  scaler.update(overflow(true));  // a skip resets the clean-step count
  EXPECT_EQ(scaler.growth_tracker(), 0);
  EXPECT_EQ(scaler.scale_value(), 65536.0);
}

TEST(LossScaler, DisabledScalerLeavesLossAndGradientsButStillDetectsNaN) {
  LossScaler scaler(false, torch::kCPU);
  const torch::Tensor loss = torch::tensor(0.5f);
  EXPECT_TRUE(torch::equal(scaler.scale(loss), loss));
  torch::Tensor grad = torch::tensor({0.1f, -3.0f});
  const torch::Tensor before = grad.clone();
  EXPECT_TRUE(all_finite(scaler, {grad}));
  EXPECT_TRUE(torch::equal(grad, before));
  torch::Tensor bad = torch::tensor({std::numeric_limits<float>::quiet_NaN()});
  EXPECT_FALSE(all_finite(scaler, {bad}));
  scaler.update(overflow(true));
  EXPECT_EQ(scaler.scale_value(), 1.0);
}

TEST(LossScaler, StateRoundTripsForCheckpoints) {
  LossScaler scaler(true, torch::kCPU);
  scaler.set_state(1024.0, 17);
  EXPECT_EQ(scaler.scale_value(), 1024.0);
  EXPECT_EQ(scaler.growth_tracker(), 17);
}

TEST(Autocast, ComputesInTheLowPrecisionDtypeInsideTheScopeOnly) {
  const torch::Tensor a = torch::randn({4, 4});
  const torch::Tensor b = torch::randn({4, 4});
  {
    AutocastGuard outer(torch::kCPU, Precision::bf16);
    EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kBFloat16);
    {
      AutocastGuard inner(torch::kCPU, Precision::bf16);
      EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kBFloat16);
    }
    EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kBFloat16);
  }
  EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kFloat);
  {
    AutocastGuard none(torch::kCPU, Precision::fp32);
    EXPECT_EQ(torch::mm(a, b).scalar_type(), torch::kFloat);
  }
}

// docs/memory.md: without the cast cache each use casts anew, so no half copy of a weight
// outlives the layer that used it; the values are the same, and the caller's setting returns.
TEST(Autocast, WithoutTheCastCacheGivesTheSameValuesAndRestoresTheSetting) {
  ASSERT_TRUE(at::autocast::is_autocast_cache_enabled());
  torch::manual_seed(5);
  torch::nn::Linear layer(16, 16);
  const torch::Tensor x = torch::randn({4, 16});
  torch::Tensor cached, uncached;
  {
    AutocastGuard guard(torch::kCPU, Precision::bf16);
    cached = layer(x);
  }
  {
    AutocastGuard guard(torch::kCPU, Precision::bf16, /*cache_casts=*/false);
    EXPECT_FALSE(at::autocast::is_autocast_cache_enabled());
    uncached = layer(x);
  }
  EXPECT_TRUE(at::autocast::is_autocast_cache_enabled());
  EXPECT_EQ(uncached.scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(cached, uncached));
}

TEST(Precision, ParsesConfigNames) {
  EXPECT_EQ(parse_precision("no"), Precision::fp32);
  EXPECT_EQ(parse_precision("fp16"), Precision::fp16);
  EXPECT_EQ(parse_precision("bf16"), Precision::bf16);
  EXPECT_THROW(parse_precision("fp8"), std::exception);
}

}  // namespace
}  // namespace sdtrain::train
