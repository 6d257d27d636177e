// Lean mode's stochastic rounding (include/sdtrain/optim/adam_element_math.h, docs/memory.md):
// the bits depend only on (seed, parameter, step, element), the rounding goes to one of the two
// neighbouring bf16 values with the right odds, and an update far below half a bf16 step still
// moves the weights on average where round-to-nearest loses it. The CUDA side's bit-identity is
// in adamw8bit_cuda_test.cpp.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/optim/adamw8bit.h"

namespace sdtrain::optim {
namespace {

float bf16_value(std::uint16_t bits) {
  return static_cast<float>(c10::BFloat16(bits, c10::BFloat16::from_bits()));
}

TEST(StochasticRounding, LandsOnANeighbourWithTheRightOdds) {
  // 1 + 0.25 ulp of bf16 (ulp at 1 is 2^-7): up a quarter of the time.
  const float x = 1.0f + 0.25f * 0.0078125f;
  int up = 0;
  const int draws = 20000;
  for (int i = 0; i < draws; ++i) {
    const float rounded = bf16_value(bf16_bits_rounded_stochastically(x, rounding_bits(99, i)));
    ASSERT_TRUE(rounded == 1.0f || rounded == 1.0078125f) << rounded;
    up += rounded > 1.0f;
  }
  // Binomial(20000, 0.25): sd 61; 5 sd either side.
  EXPECT_NEAR(up, draws / 4, 310);
  // Exact bf16 values stay; inf stays inf; NaN stays NaN.
  EXPECT_EQ(bf16_value(bf16_bits_rounded_stochastically(1.5f, 0xffffffffu)), 1.5f);
  EXPECT_TRUE(std::isinf(bf16_value(bf16_bits_rounded_stochastically(INFINITY, 12345))));
  EXPECT_TRUE(std::isnan(bf16_value(bf16_bits_rounded_stochastically(NAN, 12345))));
}

NamedParameters ones(int64_t n) {
  return {{"w", torch::ones({n}, torch::kBFloat16).set_requires_grad(true)}};
}

// Steps with a constant gradient and a learning rate whose update (lr per step, Adam's
// normalised step) is 1/8 of a bf16 step at 1.0: round-to-nearest never moves the weights.
torch::Tensor train(bool stochastic, uint64_t seed, int steps = 16, int64_t n = 8192) {
  NamedParameters params = ones(n);
  OptimizerOptions options;
  options.lr = 0.0078125 / 8;
  options.weight_decay = 0;
  options.stochastic_rounding = stochastic;
  options.rounding_seed = seed;
  AdamW8bit optimizer(params, options);
  const torch::Tensor grad = torch::full({n}, -1.0, torch::kBFloat16);  // pushes weights up
  for (int i = 0; i < steps; ++i) optimizer.step_parameter(0, grad);
  return params[0].second.detach().to(torch::kFloat32);
}

TEST(StochasticRounding, KeepsUpdatesThatRoundToNearestLoses) {
  const torch::Tensor nearest = train(false, 0);
  EXPECT_TRUE(torch::equal(nearest, torch::ones_like(nearest)));  // every update lost
  const torch::Tensor stochastic = train(true, 7);
  // Expected movement: 16 steps x lr = 16/8 of a bf16 step = 0.015625; measured on the mean of
  // 8192 weights, whose standard error is far below the 10 % allowed here.
  EXPECT_NEAR(stochastic.mean().item<double>() - 1.0, 16 * 0.0078125 / 8, 0.1 * 16 * 0.0078125 / 8);
}

TEST(StochasticRounding, TheSeedDecidesTheBits) {
  EXPECT_TRUE(torch::equal(train(true, 7), train(true, 7)));
  EXPECT_FALSE(torch::equal(train(true, 7), train(true, 8)));
}

}  // namespace
}  // namespace sdtrain::optim
