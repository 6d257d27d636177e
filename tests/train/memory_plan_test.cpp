// The lean-memory decisions of the plan (include/sdtrain/train/memory_plan.h, docs/memory.md):
// when fused_backward_pass turns on, what it refuses and what it announces; lean mode's checks;
// the estimate's accounting; memory_budget's choice, in order, with a line per change.
#include "sdtrain/train/memory_plan.h"

#include <gtest/gtest.h>

#include "sdtrain/util/error.h"
#include "test_support.h"

namespace sdtrain::train {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

TrainConfig config_with(const std::vector<std::string>& overrides) {
  std::vector<std::string> all = {"pretrained_model_name_or_path=/model",
                                  "instance_data_dir=/photos"};
  all.insert(all.end(), overrides.begin(), overrides.end());
  return load_train_config({}, all);
}

bool has_note(const std::vector<std::string>& notes, const std::string& text) {
  for (const auto& note : notes)
    if (note.find(text) != std::string::npos) return true;
  return false;
}

std::string refusal(const std::function<void()>& action) {
  try {
    action();
  } catch (const ConfigError& error) {
    return error.what();
  }
  return "(no error)";
}

TEST(FusedBackwardDecision, AutoTurnsOnOnlyWhereTheResultIsUnchanged) {
  std::vector<std::string> notes;
  EXPECT_FALSE(decide_fused_backward_pass(config_with({}), notes));  // max_grad_norm 1.0
  EXPECT_FALSE(
      decide_fused_backward_pass(config_with({"max_grad_norm=0", "mixed_precision=fp16"}), notes));
  EXPECT_FALSE(decide_fused_backward_pass(
      config_with({"max_grad_norm=0", "gradient_accumulation_steps=2"}), notes));
  EXPECT_TRUE(notes.empty());
  EXPECT_TRUE(
      decide_fused_backward_pass(config_with({"max_grad_norm=0", "mixed_precision=bf16"}), notes));
  EXPECT_TRUE(has_note(notes, "fused_backward_pass auto: on")) << notes.front();
  notes.clear();
  EXPECT_FALSE(decide_fused_backward_pass(
      config_with({"max_grad_norm=0", "fused_backward_pass=false"}), notes));
  EXPECT_TRUE(notes.empty());
}

TEST(FusedBackwardDecision, RefusesGradientAccumulation) {
  std::vector<std::string> notes;
  const std::string message = refusal([&] {
    decide_fused_backward_pass(
        config_with({"fused_backward_pass=true", "gradient_accumulation_steps=4"}), notes);
  });
  EXPECT_NE(message.find("\"gradient_accumulation_steps\": 4 sums that many backward passes"),
            std::string::npos)
      << message;
  EXPECT_NE(message.find("set gradient_accumulation_steps 1"), std::string::npos) << message;
}

TEST(FusedBackwardDecision, AnnouncesPerTensorClippingAndPerTensorOverflowSkips) {
  std::vector<std::string> notes;
  EXPECT_TRUE(decide_fused_backward_pass(
      config_with({"fused_backward_pass=true", "max_grad_norm=1.0", "mixed_precision=fp16"}),
      notes));
  ASSERT_EQ(notes.size(), 2u);
  EXPECT_TRUE(has_note(notes, "max_grad_norm 1 clips each tensor's gradient by its own norm"))
      << notes[0];
  EXPECT_TRUE(has_note(notes, "skips only the tensors whose gradients are inf/NaN")) << notes[1];
}

TEST(LeanWeights, RefusesWhatCannotWorkAndAnnouncesTheRest) {
  std::vector<std::string> notes;
  EXPECT_NE(refusal([&] {
              check_lean_weights(config_with({"weight_dtype=bf16", "mixed_precision=bf16"}), notes);
            }).find("needs \"optimizer\": \"adamw8bit\""),
            std::string::npos);
  EXPECT_NE(refusal([&] {
              check_lean_weights(config_with({"weight_dtype=bf16", "optimizer=adamw8bit"}), notes);
            }).find("needs \"mixed_precision\" \"bf16\" or \"fp16\""),
            std::string::npos);
  EXPECT_NE(refusal([&] {
              check_lean_weights(config_with({"weight_dtype=bf16", "optimizer=adamw8bit",
                                              "mixed_precision=bf16", "train_mode=lora"}),
                                 notes);
            }).find("LoRA run's adapters"),
            std::string::npos);
  EXPECT_TRUE(notes.empty());
  check_lean_weights(
      config_with({"weight_dtype=bf16", "optimizer=adamw8bit", "mixed_precision=fp16"}), notes);
  EXPECT_TRUE(has_note(notes, "rounded stochastically"));
}

// SD 2.1-base's sizes, in round tensors: what the plan reads from the weight headers.
std::vector<ComponentSize> sd21_sizes() {
  ComponentSize unet{"unet", 0, {}, {}};
  for (int i = 0; i < 686; ++i) unet.tensor_sizes.push_back(1262000);
  unet.tensor_sizes.push_back(6553600);  // the largest two
  unet.tensor_sizes.push_back(5000000);
  for (int64_t n : unet.tensor_sizes) unet.parameters += n;
  ComponentSize text{"text_encoder", 340387840, {340387840}, {}};
  ComponentSize vae{"vae", 83653863, {83653863}, {}};
  return {unet, text, vae};
}

TEST(MemoryEstimate, CountsWhatTheRunHoldsOnTheDevice) {
  const auto sizes = sd21_sizes();
  const int64_t unet = sizes[0].parameters;
  const TrainConfig base = config_with({"mixed_precision=fp16", "with_prior_preservation=true",
                                        "class_prompt=a cat", "gradient_checkpointing=true"});
  const MemoryEstimate plain = estimate_memory(base, sizes, true, false);
  EXPECT_EQ(plain.trained_weights, 4 * unet);
  EXPECT_EQ(plain.gradients, 4 * unet);
  EXPECT_EQ(plain.frozen_weights, 2 * sizes[2].parameters);  // the VAE stays; the text encoder left
  EXPECT_EQ(plain.autocast_copies, 0);                       // checkpointing: transient
  const MemoryEstimate fused = estimate_memory(base, sizes, true, true);
  EXPECT_EQ(fused.gradients, 4 * (6553600 + 5000000));
  TrainConfig lean = base;
  lean.compute.weight_dtype = Precision::bf16;
  lean.data.cache_latents = true;
  lean.data.center_crop = true;
  const MemoryEstimate lean_estimate = estimate_memory(lean, sizes, true, true);
  EXPECT_EQ(lean_estimate.trained_weights, 2 * unet);
  EXPECT_EQ(lean_estimate.frozen_weights, 0);  // VAE cached, text encoder encoded: both on the host
  TrainConfig no_checkpointing = base;
  no_checkpointing.compute.gradient_checkpointing = false;
  const MemoryEstimate full = estimate_memory(no_checkpointing, sizes, true, false);
  EXPECT_EQ(full.autocast_copies, 2 * unet);
  EXPECT_GT(full.activations, plain.activations);
  TrainConfig bigger_batch = base;
  bigger_batch.length.train_batch_size = 2;
  EXPECT_EQ(estimate_memory(bigger_batch, sizes, true, false).activations, 2 * plain.activations);
}

TEST(MemoryBudget, ChoosesTheLeanestSettingsInOrderAndSaysWhy) {
  TrainConfig config = config_with({"mixed_precision=fp16", "with_prior_preservation=true",
                                    "class_prompt=a cat", "center_crop=true"});
  std::vector<std::string> notes;
  choose_settings_for_budget(config, sd21_sizes(), static_cast<int64_t>(6 * kGiB), notes);
  EXPECT_TRUE(config.compute.gradient_checkpointing);
  EXPECT_EQ(config.resolved_optimizer(), "adamw8bit");
  EXPECT_TRUE(config.data.cache_latents);
  EXPECT_EQ(config.compute.fused_backward_pass, AutoSwitch::on);
  ASSERT_GE(notes.size(), 4u);
  EXPECT_NE(notes[0].find("gradient_checkpointing on"), std::string::npos) << notes[0];
  EXPECT_NE(notes[1].find("optimizer adamw8bit"), std::string::npos) << notes[1];
  EXPECT_LE(estimate_memory(config, sd21_sizes(), true, true).total(),
            static_cast<int64_t>(6 * kGiB));

  TrainConfig roomy = config_with({});
  notes.clear();
  choose_settings_for_budget(roomy, sd21_sizes(), static_cast<int64_t>(80 * kGiB), notes);
  EXPECT_FALSE(roomy.compute.gradient_checkpointing);
  EXPECT_TRUE(has_note(notes, "the settings as given fit"));

  TrainConfig tight = config;
  const std::string message = refusal([&] {
    choose_settings_for_budget(tight, sd21_sizes(), static_cast<int64_t>(1 * kGiB), notes);
  });
  EXPECT_NE(message.find("even the leanest settings need an estimated"), std::string::npos)
      << message;
}

// The EMA weights count on the device only when they stay there, and for what the UNet trains.
TEST(MemoryEstimate, CountsTheEmaWeightsWhereTheyStayOnTheDevice) {
  const auto sizes = sd21_sizes();
  const int64_t unet = sizes[0].parameters;
  const TrainConfig base = config_with({"mixed_precision=fp16", "use_ema=true"});
  EXPECT_TRUE(base.ema.offload_ema);
  EXPECT_EQ(estimate_memory(base, sizes, true, false).ema_shadow, 0);
  TrainConfig on_device = base;
  on_device.ema.offload_ema = false;
  const MemoryEstimate kept = estimate_memory(on_device, sizes, true, false);
  EXPECT_EQ(kept.ema_shadow, 4 * unet);
  EXPECT_EQ(kept.total() - estimate_memory(base, sizes, true, false).total(), 4 * unet);
  EXPECT_EQ(estimate_memory(on_device, sizes, false, false).ema_shadow, 0);  // the CPU run
  TrainConfig without = on_device;
  without.ema.use_ema = false;
  EXPECT_EQ(estimate_memory(without, sizes, true, false).ema_shadow, 0);
}

// Moving the EMA weights off the GPU changes no result, so the budget takes it first.
TEST(MemoryBudget, OffloadsTheEmaWeightsFirst) {
  TrainConfig config = config_with({"mixed_precision=fp16", "use_ema=true", "offload_ema=false"});
  const int64_t as_given = estimate_memory(config, sd21_sizes(), true, false).total();
  std::vector<std::string> notes;
  choose_settings_for_budget(config, sd21_sizes(), as_given - 1, notes);
  EXPECT_TRUE(config.ema.offload_ema);
  EXPECT_FALSE(config.compute.gradient_checkpointing);  // offloading alone fit
  ASSERT_FALSE(notes.empty());
  EXPECT_NE(notes[0].find("offload_ema on"), std::string::npos) << notes[0];
}

TEST(MemoryBudget, ParsesNullAutoAndGiB) {
  EXPECT_EQ(config_with({}).compute.memory_budget.kind, MemoryBudget::Kind::none);
  EXPECT_EQ(config_with({"memory_budget=auto"}).compute.memory_budget.kind,
            MemoryBudget::Kind::automatic);
  const TrainConfig six = config_with({"memory_budget=6"});
  EXPECT_EQ(six.compute.memory_budget.kind, MemoryBudget::Kind::gib);
  EXPECT_EQ(six.compute.memory_budget.gib, 6.0);
  EXPECT_NE(refusal([] { config_with({"memory_budget=-1"}); }).find("a number of GiB > 0"),
            std::string::npos);
  EXPECT_NE(refusal([] {
              config_with({"fused_backward_pass=sometimes"});
            }).find("expected \"auto\", true or false"),
            std::string::npos);
}

}  // namespace
}  // namespace sdtrain::train
