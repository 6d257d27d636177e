// UNet2DConditionModel against diffusers: forward outputs and the gradients of a fixed scalar
// loss w.r.t. every parameter and the inputs, on the tiny models of
// tools/make_unet_vae_fixtures.py, in fp32 on CPU.
//
// Tolerance: max|ours - ref| <= kTolerance * max|ref| for outputs and input gradients, and
// kGradientTolerance for parameter gradients. Both sides run the same ATen CPU kernels (conv,
// GroupNorm, SDPA, GELU) in the same order, so the only differences come from reductions split
// differently (thread count, and the CPU capability's vector width: scalar, AVX2, AVX-512).
// Outputs agree to ~1e-6. A parameter gradient is a sum over every position, and for the
// normalisation weights that sum nearly cancels, so its last bits move most: across
// capabilities and 1-4 threads the worst ratio measured is 1.44e-5 (DEFAULT, 2 threads;
// docs/parity.md), and the reference regenerated on another CPU moves as much against its own
// committed fixture. Any real mistake (a wrong eps, head split or skip order) moves outputs and
// gradients by >1e-3.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/models/unet_2d_condition.h"
#include "unet_vae_support.h"

using namespace sdtrain;
using namespace sdtrain::models;
using sdtrain::testing::describe;
using sdtrain::testing::difference;

namespace {

constexpr double kTolerance = 1e-5;          // relative to max|ref|, see the file comment
constexpr double kGradientTolerance = 1.5e-5;  // parameter gradients, see the file comment

UNet2DConditionModel load_fixture_unet(const std::string& name) {
  return load_unet(sdtrain::testing::model_fixture(name), LoadOptions{});
}

class UNetForwardParity : public ::testing::TestWithParam<std::string> {};

TEST_P(UNetForwardParity, MatchesDiffusers) {
  const std::string name = GetParam();
  auto unet = load_fixture_unet(name);
  auto io = sdtrain::testing::read_fixture_tensors(name + "_io.safetensors");
  torch::NoGradGuard no_grad;
  unet->eval();
  torch::Tensor out = unet(io.at("sample"), io.at("timestep"), io.at("encoder_hidden_states"));
  auto d = difference(out, io.at("out"));
  RecordProperty("max_abs", std::to_string(d.max_abs));
  RecordProperty("ratio", std::to_string(d.relative()));
  std::cout << "[ measured ] " << name << " forward: " << d.max_abs << " abs, " << d.relative() << " relative\n";
  EXPECT_GT(d.max_ref, 0.1) << "reference output is degenerate";
  EXPECT_LE(d.max_abs, kTolerance * d.max_ref) << name << " forward: " << describe(d);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, UNetForwardParity, ::testing::Values("unet_sd2", "unet_sd15", "unet_upcast"));

class UNetGradientParity : public ::testing::TestWithParam<std::string> {};

TEST_P(UNetGradientParity, EveryParameterGradientMatchesDiffusers) {
  const std::string name = GetParam();
  auto unet = load_fixture_unet(name);
  auto io = sdtrain::testing::read_fixture_tensors(name + "_io.safetensors");
  unet->train();  // no dropout or batch statistics in this model: train and eval agree
  torch::Tensor sample = io.at("sample").clone().requires_grad_(true);
  torch::Tensor context = io.at("encoder_hidden_states").clone().requires_grad_(true);
  torch::Tensor out = unet(sample, io.at("timestep"), context);
  torch::Tensor loss = (out * io.at("loss_weights")).sum();
  loss.backward();

  auto dl = difference(loss.reshape({1}), io.at("loss"));
  EXPECT_LE(dl.max_abs, kTolerance * std::max(1.0, dl.max_ref)) << "loss: " << describe(dl);

  double worst = 0;
  std::string worst_key;
  std::size_t compared = 0;
  for (const auto& item : unet->named_parameters()) {
    auto it = io.find("grad." + item.key());
    ASSERT_NE(it, io.end()) << "no reference gradient for " << item.key() << "; " << sdtrain::testing::kRegenerateFixtures;
    ASSERT_TRUE(item.value().grad().defined()) << item.key() << " got no gradient";
    auto d = difference(item.value().grad(), it->second);
    // Per tensor: relative to that gradient's own scale (floored at 1e-3 of the loss scale for
    // gradients that are almost zero, e.g. biases right before a GroupNorm).
    const double scale = std::max(d.max_ref, 1e-3);
    EXPECT_LE(d.max_abs, kGradientTolerance * scale) << "grad of " << item.key() << ": " << describe(d);
    if (d.max_abs / scale > worst) worst = d.max_abs / scale, worst_key = item.key();
    ++compared;
  }
  std::size_t expected_count = 0;
  for (const auto& [key, value] : io) expected_count += key.rfind("grad.", 0) == 0;
  EXPECT_EQ(compared, expected_count) << "reference has gradients for parameters we lack";
  std::cout << "[ measured ] " << name << ": " << compared << " parameter gradients, worst ratio " << worst << " ("
            << worst_key << ", " << at::get_cpu_capability() << ", " << at::get_num_threads() << " threads)\n";

  for (const auto& [key, tensor] : {std::pair{"sample", sample}, std::pair{"encoder_hidden_states", context}}) {
    auto d = difference(tensor.grad(), io.at(std::string("grad_input.") + key));
    EXPECT_LE(d.max_abs, kTolerance * d.max_ref) << "grad of " << key << ": " << describe(d);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, UNetGradientParity, ::testing::Values("unet_sd2", "unet_sd15"));

TEST(UNetParity, InputGradientsOfUpcastModelMatch) {
  auto unet = load_fixture_unet("unet_upcast");
  auto io = sdtrain::testing::read_fixture_tensors("unet_upcast_io.safetensors");
  torch::Tensor sample = io.at("sample").clone().requires_grad_(true);
  torch::Tensor context = io.at("encoder_hidden_states").clone().requires_grad_(true);
  torch::Tensor loss = (unet(sample, io.at("timestep"), context) * io.at("loss_weights")).sum();
  loss.backward();
  auto ds = difference(sample.grad(), io.at("grad_input.sample"));
  auto dc = difference(context.grad(), io.at("grad_input.encoder_hidden_states"));
  EXPECT_LE(ds.max_abs, kTolerance * ds.max_ref) << describe(ds);
  EXPECT_LE(dc.max_abs, kTolerance * dc.max_ref) << describe(dc);
}

TEST(UNetParity, ScalarAndBatchedTimestepsAgree) {
  auto unet = load_fixture_unet("unet_sd15");
  auto io = sdtrain::testing::read_fixture_tensors("unet_sd15_io.safetensors");
  torch::NoGradGuard no_grad;
  torch::Tensor t = io.at("timestep");
  ASSERT_EQ(t.dim(), 0);
  torch::Tensor scalar = unet(io.at("sample"), t, io.at("encoder_hidden_states"));
  torch::Tensor batched = unet(io.at("sample"), t.reshape({1}).expand({2}).contiguous(), io.at("encoder_hidden_states"));
  EXPECT_TRUE(torch::equal(scalar, batched));
  // An integer timestep is converted exactly like the float one of the same value.
  torch::Tensor as_int = unet(io.at("sample"), torch::tensor({500, 500}), io.at("encoder_hidden_states"));
  torch::Tensor as_float = unet(io.at("sample"), torch::tensor({500.0f, 500.0f}), io.at("encoder_hidden_states"));
  EXPECT_TRUE(torch::equal(as_int, as_float));
  EXPECT_FALSE(torch::allclose(as_float, scalar)) << "timestep has no effect";
}

}  // namespace
