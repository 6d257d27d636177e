// The update without host synchronisation (include/sdtrain/train/update.h, docs/performance.md):
// apply queues the step and reads nothing on the host; settle, a forward pass later, reports it
// and does what needs the host to know the overflow flag. On the CPU: the flag decides on the
// device side (the weights and the scale change before anyone reads it), settle reports each
// step once, EMA averages the stepped weights, and a run without loss scaling ends at settle
// with the weights of the step before. On CUDA (skipped without a GPU): apply runs under
// CUDA's sync debug mode set to "error", and an overflow the kernels skipped is taken back at
// settle.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <limits>

#include "sdtrain/util/error.h"
#include "sync_debug.h"
#include "update_support.h"

namespace sdtrain::train {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

bool all_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  for (size_t i = 0; i < a.size(); ++i) {
    if (!torch::equal(a[i].cpu(), b[i].cpu())) return false;
  }
  return a.size() == b.size();
}

TEST(SyncFreeUpdate, ApplyQueuesTheStepAndSettleReportsItOnce) {
  ToyRun run("adamw8bit", false, /*loss_scaling=*/true, /*max_grad_norm=*/1.0);
  const auto before = run.weights();
  run.backward(0);
  run.update->apply(0);
  EXPECT_TRUE(run.update->pending());
  EXPECT_FALSE(all_equal(run.weights(), before)) << "apply did not step the weights";
  run.backward(1);
  EXPECT_THROW(run.update->apply(1), std::logic_error) << "apply over an unsettled step";
  const std::optional<UpdateResult> result = run.update->settle();
  ASSERT_TRUE(result.has_value());
  EXPECT_FALSE(result->skipped);
  EXPECT_GT(result->grad_norm, 0.0);
  EXPECT_EQ(result->loss_scale, 65536.0);
  EXPECT_DOUBLE_EQ(result->lr, 1e-2);
  EXPECT_FALSE(run.update->pending());
  EXPECT_FALSE(run.update->settle().has_value());
}

TEST(SyncFreeUpdate, AnOverflowIsSkippedAndTheScaleBacksOffBeforeTheHostReadsTheFlag) {
  ToyRun run("adamw8bit", false, /*loss_scaling=*/true);
  run.step(0);
  const auto before = run.weights();
  run.backward(1, kInf);
  run.update->apply(1);
  // Nothing read yet: the device-side flag alone kept the weights and halved the scale.
  EXPECT_TRUE(run.update->pending());
  EXPECT_TRUE(all_equal(run.weights(), before));
  EXPECT_EQ(run.scaler.scale_value(), 32768.0);
  const UpdateResult result = *run.update->settle();
  EXPECT_TRUE(result.skipped);
  EXPECT_EQ(result.grad_norm, 0.0);
  EXPECT_EQ(result.loss_scale, 65536.0);  // the scale the skipped step used
  for (size_t i = 0; i < run.trained->parameters().size(); ++i)
    EXPECT_EQ(run.update->optimizer().step_count(i), 1);
  EXPECT_FALSE(run.step(2).skipped);
}

TEST(SyncFreeUpdate, WithoutLossScalingSettleEndsTheRunWithTheWeightsOfTheStepBefore) {
  ToyRun run("adamw", false, /*loss_scaling=*/false);
  run.step(0);
  const auto before = run.weights();
  run.backward(1, kInf);
  run.update->apply(1);
  EXPECT_TRUE(all_equal(run.weights(), before));
  try {
    run.update->settle();
    FAIL() << "no error";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ExitCode::training_diverged);
    EXPECT_NE(std::string(error.what()).find("inf/NaN at step 2"), std::string::npos)
        << error.what();
  }
}

// EMA runs at settle: it must average the weights of the step it follows, not the next one's.
TEST(SyncFreeUpdate, EmaAveragesTheWeightsOfTheSettledStep) {
  ToyRun run("adamw", false, false, 0, torch::kCPU, /*use_ema=*/true);
  run.step(0);  // EMA's first step copies the weights; the second averages
  run.backward(1);
  run.update->apply(1);
  const auto stepped = run.weights();
  std::vector<torch::Tensor> shadow_before;
  for (const auto& [name, value] : run.ema->shadow()) shadow_before.push_back(value.clone());
  std::vector<torch::Tensor> expected;
  run.update->settle();
  const double decay = run.ema->current_decay();
  ASSERT_GT(decay, 0.0);
  for (size_t i = 0; i < stepped.size(); ++i) {
    const torch::Tensor old = shadow_before[i];
    expected.push_back(old - (1 - decay) * (old - stepped[i]));
  }
  for (size_t i = 0; i < expected.size(); ++i)
    EXPECT_TRUE(torch::allclose(run.ema->shadow()[i].second, expected[i], 0, 1e-7));
}

// adamw8bit's CUDA kernels, and adamw's fused kernel (float32 parameters on a GPU), with fp16
// loss scaling and clipping: the whole update, overflow included, without one host
// synchronisation; settle then takes the overflowed step's counts back.
class SyncFreeUpdateOnCuda : public ::testing::TestWithParam<std::string> {};

TEST_P(SyncFreeUpdateOnCuda, ApplyNeverSynchronises) {
#if !SDTRAIN_WITH_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const torch::Device cuda(torch::kCUDA);
  ToyRun run(GetParam(), false, /*loss_scaling=*/true, /*max_grad_norm=*/1.0, cuda);
  run.step(0);  // first calls pick kernels, copy the quantization maps, create handles
  for (int64_t step = 1; step <= 2; ++step) {
    run.backward(step, step == 2 ? kInf : 1.0);
    torch::cuda::synchronize();
    const auto before = run.weights();
    try {
      sdtrain::testing::SyncDebugError error_on_sync;
      run.update->apply(step);
      // The detector is live: reading a value back is a synchronisation.
      EXPECT_THROW((void)run.scaler.scale_value(), c10::Error);
    } catch (const c10::Error& e) {
      FAIL() << "the update synchronised with the host: " << e.what_without_backtrace();
    }
    const UpdateResult result = *run.update->settle();
    EXPECT_EQ(result.skipped, step == 2);
    EXPECT_EQ(all_equal(run.weights(), before), step == 2);
    for (size_t i = 0; i < run.trained->parameters().size(); ++i)
      EXPECT_EQ(run.update->optimizer().step_count(i), 2) << "after step " << step;
  }
#endif
}

INSTANTIATE_TEST_SUITE_P(Optimizer, SyncFreeUpdateOnCuda, ::testing::Values("adamw8bit", "adamw"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace sdtrain::train
