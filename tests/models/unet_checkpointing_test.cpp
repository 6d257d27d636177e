// Gradient checkpointing in the UNet: same gradients as without it, and less memory held
// between forward and backward.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/models/unet_2d_condition.h"
#include "unet_vae_support.h"

using namespace sdtrain;
using namespace sdtrain::models;

namespace {

struct TrainingRun {
  std::map<std::string, torch::Tensor> grads;
  torch::Tensor sample_grad;
  int64_t live_after_forward = 0;  // bytes allocated by forward and still held for backward
  int64_t peak = 0;                // peak over forward + backward, relative to the start
};

TrainingRun run(UNet2DConditionModel& unet, const std::map<std::string, torch::Tensor>& io, const torch::Tensor& sample_in,
        bool checkpointing) {
  unet->set_gradient_checkpointing(checkpointing);
  unet->zero_grad();
  TrainingRun r;
  torch::Tensor sample = sample_in.clone().requires_grad_(true);
  auto tracker = std::make_shared<sdtrain::testing::LiveCPUBytes>();
  {
    c10::DebugInfoGuard guard(c10::DebugInfoKind::PROFILER_STATE, tracker);
    torch::Tensor out = unet(sample, io.at("timestep"), io.at("encoder_hidden_states"));
    r.live_after_forward = tracker->current;
    torch::Tensor weights = torch::ones_like(out);  // any fixed weighting; same in both runs
    (out * weights).sum().backward();
  }
  r.peak = tracker->peak;
  for (const auto& item : unet->named_parameters()) r.grads[item.key()] = item.value().grad().clone();
  r.sample_grad = sample.grad().clone();
  return r;
}

TEST(UNetCheckpointing, SameGradientsAndLessActivationMemory) {
  auto unet = load_unet(sdtrain::testing::model_fixture("unet_sd2"), LoadOptions{});
  auto io = sdtrain::testing::read_fixture_tensors("unet_sd2_io.safetensors");
  // 32x32 latents (instead of the fixture's 8x8) so activations dominate the held memory.
  torch::manual_seed(0);
  torch::Tensor sample = torch::randn({2, 4, 32, 32});

  TrainingRun plain = run(unet, io, sample, false);
  TrainingRun checkpointed = run(unet, io, sample, true);
  EXPECT_TRUE(unet->gradient_checkpointing());

  // The recomputation runs the same kernels on the same inputs, but the gradients of tensors
  // with several consumers (each skip connection feeds the next block and the up path) are
  // summed in a different order once blocks are separate graph nodes, so fp32 rounding
  // differs slightly: same bound as the diffusers parity (1e-5 of each gradient's max).
  ASSERT_EQ(plain.grads.size(), checkpointed.grads.size());
  double worst = 0;
  for (const auto& [key, grad] : plain.grads) {
    auto d = sdtrain::testing::difference(checkpointed.grads.at(key), grad);
    const double scale = std::max(d.max_ref, 1e-3);
    EXPECT_LE(d.max_abs, 1e-5 * scale) << key << ": " << sdtrain::testing::describe(d);
    worst = std::max(worst, d.max_abs / scale);
  }
  auto ds = sdtrain::testing::difference(checkpointed.sample_grad, plain.sample_grad);
  EXPECT_LE(ds.max_abs, 1e-5 * ds.max_ref) << sdtrain::testing::describe(ds);
  std::cout << "[ measured ] checkpointed vs plain gradients: worst ratio " << worst << "\n";

  // Activation memory: what forward leaves allocated for backward. Checkpointing keeps only
  // each resnet's and transformer block's inputs, not their intermediates (GroupNorm, SiLU,
  // conv, q/k/v, attention, GEGLU outputs).
  const double ratio = static_cast<double>(checkpointed.live_after_forward) / static_cast<double>(plain.live_after_forward);
  std::cout << "[ measured ] held after forward: " << plain.live_after_forward / 1024 << " KiB plain, "
            << checkpointed.live_after_forward / 1024 << " KiB checkpointed (ratio " << ratio << "); peak "
            << plain.peak / 1024 << " KiB vs " << checkpointed.peak / 1024 << " KiB\n";
  EXPECT_GT(plain.live_after_forward, 0) << "the memory counter saw no allocation";
  EXPECT_LT(ratio, 0.35);
  EXPECT_LT(checkpointed.peak, plain.peak);
}

TEST(UNetCheckpointing, InactiveWithoutGradMode) {
  auto unet = load_unet(sdtrain::testing::model_fixture("unet_sd2"), LoadOptions{});
  auto io = sdtrain::testing::read_fixture_tensors("unet_sd2_io.safetensors");
  unet->set_gradient_checkpointing(true);
  torch::NoGradGuard no_grad;
  torch::Tensor out = unet(io.at("sample"), io.at("timestep"), io.at("encoder_hidden_states"));
  EXPECT_FALSE(out.requires_grad());
  auto d = sdtrain::testing::difference(out, io.at("out"));
  EXPECT_LE(d.max_abs, 1e-5 * d.max_ref) << sdtrain::testing::describe(d);
}

}  // namespace
