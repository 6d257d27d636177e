// `sdtrain train` end to end on the bundled tiny model (CPU, fp32):
//  * step parity: tools/dreambooth_reference.py replays the same micro-batches (same initial
//    weights, latents, noise, timesteps) with diffusers' UNet2DConditionModel, transformers'
//    CLIPTextModel and torch.optim.AdamW as train_dreambooth.py does, and the losses and final
//    weights must agree;
//  * resume: N steps straight equal N/2 + resume + N/2, bit for bit;
//  * interruption (SIGTERM) saves a checkpoint and exits 143;
//  * bad input: an output_dir holding another run, divergence.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/atomic_file.h"
#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;
using sdtrain::testing::run_command;

namespace {

using sdtrain::testing::demo;
using sdtrain::testing::write_config;

using RunResult = sdtrain::testing::CommandResult;

RunResult sdtrain(const std::string& args) { return sdtrain::testing::run_sdtrain(args); }

nlohmann::json reference_replay(const fs::path& dir, int total_steps) {
  std::string output;
  const std::string command = sdtrain::testing::reference_python() + " " +
                              (sdtrain::testing::source_dir() / "tools" / "dreambooth_reference.py").string() +
                              " --model " + (demo() / "model").string() + " --output " + (dir / "out").string() +
                              " --dump " + (dir / "dump").string() + " --total-steps " + std::to_string(total_steps);
  const int code = run_command(command, &output);
  EXPECT_EQ(code, 0) << output;
  return nlohmann::json::parse(output.substr(output.rfind("\n{") == std::string::npos ? 0 : output.rfind("\n{") + 1));
}

// Relative loss tolerance: both sides run the same fp32 ATen kernels on the same inputs; the
// UNet forward is bit-identical to diffusers' and gradients agree to < 1e-6 relative
// (tests/models), so what remains is accumulation-order round-off compounding over 10 steps.
constexpr double kLossTolerance = 1e-5;
// Final weights. Adam divides each element's step by its own gradient scale, so an element
// whose gradient is pure round-off (sign undetermined) can move by up to lr per step either way
// on each side: the maximum difference says little. What must hold: the differences, taken
// together, are tiny next to what training changed (relative L2), and only a handful of
// elements (those round-off ones) differ by more than 1% of one step's size. A wrong learning
// rate, clipping or accumulation rule moves the relative L2 to 1e-2 and above; measured here:
// 3e-5 and 1.3e-5.
constexpr double kRelativeL2Tolerance = 1e-3;
constexpr double kFarFractionTolerance = 1e-3;

void expect_losses_match(const nlohmann::json& report, int micro_batches) {
  ASSERT_EQ(report["micro_batches"].get<int>(), micro_batches);
  const auto& ours = report["losses"];
  const auto& reference = report["reference_losses"];
  for (int i = 0; i < micro_batches; ++i) {
    const double a = ours[i].get<double>(), b = reference[i].get<double>();
    EXPECT_LE(std::abs(a - b), kLossTolerance * std::abs(b)) << "micro-batch " << i << ": " << a << " vs " << b;
  }
}

void expect_parity(const nlohmann::json& report, int micro_batches, bool text_encoder) {
  expect_losses_match(report, micro_batches);
  for (const std::string component : {"unet", "text_encoder"}) {
    if (component == "text_encoder" && !text_encoder) continue;
    const auto& stats = report[component];
    EXPECT_EQ(stats["tensors_written"], stats["tensors_expected"]) << component;
    EXPECT_GT(stats["max_abs_update"].get<double>(), 0.0) << component;
    EXPECT_LE(stats["relative_l2_diff"].get<double>(), kRelativeL2Tolerance) << component << ": " << stats.dump();
    EXPECT_LE(stats["fraction_beyond_1pct_of_lr"].get<double>(), kFarFractionTolerance) << component << ": " << stats.dump();
  }
  std::cout << "parity: " << report.dump() << "\n";
}

class TrainParity : public ::testing::Test {
 protected:
  void SetUp() override {
    if (sdtrain::testing::reference_python().empty()) GTEST_SKIP() << "no reference Python environment";
  }
};

TEST_F(TrainParity, TenStepsMatchDiffusersAndAdamW) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {});
  const RunResult run = sdtrain("--config " + config.string() + " --dump-steps " + (dir / "dump").string());
  ASSERT_EQ(run.code, 0) << run.output;
  expect_parity(reference_replay(dir, 10), 10, false);
}

TEST_F(TrainParity, PriorPreservationTextEncoderAccumulationAndWarmup) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {{"with_prior_preservation", true},
                                             {"num_class_images", 4},
                                             {"train_text_encoder", true},
                                             {"gradient_accumulation_steps", 2},
                                             {"train_batch_size", 2},
                                             {"lr_scheduler", "cosine"},
                                             {"lr_warmup_steps", 2},
                                             {"max_steps", 5}});
  const RunResult run = sdtrain("--config " + config.string() + " --dump-steps " + (dir / "dump").string());
  ASSERT_EQ(run.code, 0) << run.output;
  // 4 photos, batch 2: 2 micro-batches per epoch, one optimizer step each (accumulation 2).
  expect_parity(reference_replay(dir, 5), 10, true);
}

TEST_F(TrainParity, MinSnrWeightingWithPriorPreservation) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {{"with_prior_preservation", true},
                                             {"num_class_images", 4},
                                             {"snr_gamma", 5.0},
                                             {"train_batch_size", 2},
                                             {"max_steps", 4}});
  const RunResult run = sdtrain("--config " + config.string() + " --dump-steps " + (dir / "dump").string());
  ASSERT_EQ(run.code, 0) << run.output;
  expect_parity(reference_replay(dir, 4), 4, false);
}

// LoRA: the reference is train_dreambooth_lora.py's set-up (peft LoraConfig, gaussian init,
// the base frozen) with torch.optim.AdamW, started from sdtrain's initial adapters. The same
// tolerances as above, for the same reasons: the same fp32 kernels on the same inputs, with
// round-off compounding over the steps. Adapter parameters are few and all receive real
// gradients after the first step (B starts at 0), so the relative L2 alone is the measure.
void expect_lora_parity(const nlohmann::json& report, int micro_batches, bool text_encoder) {
  expect_losses_match(report, micro_batches);
  for (const std::string component : {"unet", "text_encoder"}) {
    if (component == "text_encoder" && !text_encoder) continue;
    ASSERT_TRUE(report.contains(component)) << report.dump();
    const auto& stats = report[component];
    EXPECT_GT(stats["tensors_compared"].get<int>(), 0) << component;
    EXPECT_EQ(stats["tensors_written"], stats["tensors_expected"]) << component;
    EXPECT_GT(stats["max_abs_update"].get<double>(), 0.0) << component;
    EXPECT_LE(stats["relative_l2_diff"].get<double>(), kRelativeL2Tolerance) << component << ": " << stats.dump();
  }
  std::cout << "LoRA parity: " << report.dump() << "\n";
}

TEST_F(TrainParity, LoRAOnUnetAndTextEncoderMatchesPeftWithPriorPreservation) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {{"train_mode", "lora"},
                                             {"lora_rank", 4},
                                             {"lora_alpha", 8},
                                             {"train_text_encoder", true},
                                             {"with_prior_preservation", true},
                                             {"num_class_images", 4},
                                             {"max_steps", 10}});
  const RunResult run = sdtrain("--config " + config.string() + " --dump-steps " + (dir / "dump").string());
  ASSERT_EQ(run.code, 0) << run.output;
  expect_lora_parity(reference_replay(dir, 10), 10, true);
}

TEST_F(TrainParity, LoRAOnFeedForwardProjectionsAndResnetConvolutionsMatchesPeft) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(
      dir, {{"train_mode", "lora"},
            {"lora_rank", 2},
            {"lora_unet_targets",
             {"to_q", "to_v", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj"}},
            {"gradient_accumulation_steps", 2},
            {"max_steps", 4}});
  const RunResult run = sdtrain("--config " + config.string() + " --dump-steps " + (dir / "dump").string());
  ASSERT_EQ(run.code, 0) << run.output;
  expect_lora_parity(reference_replay(dir, 4), 8, false);
}

std::string file_bytes(const fs::path& path) { return sdtrain::read_file(path); }

void expect_same_weights(const fs::path& a, const fs::path& b) {
  for (const std::string file : {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                 "pytorch_lora_weights.safetensors"}) {
    if (!fs::exists(a / file) && !fs::exists(b / file)) continue;
    sdtrain::io::SafetensorsFile x(a / file), y(b / file);
    ASSERT_EQ(x.tensors().size(), y.tensors().size());
    for (const auto& entry : x.tensors()) {
      ASSERT_TRUE(torch::equal(x.tensor(entry.name), y.tensor(entry.name))) << file << " " << entry.name;
    }
  }
}

void expect_resume_is_exact(const nlohmann::json& settings) {
  const fs::path straight = sdtrain::testing::scratch_dir() / "straight";
  const fs::path resumed = sdtrain::testing::scratch_dir() / "resumed";
  fs::create_directories(straight);
  fs::create_directories(resumed);
  nlohmann::json overrides = settings;
  // Both runs read the same class images (the path is part of what a resume must keep).
  write_config(straight, {});
  overrides["class_data_dir"] = (straight / "class_images").string();
  overrides["max_steps"] = 8;
  overrides["checkpointing_steps"] = 4;
  const RunResult first = sdtrain("--config " + write_config(straight, overrides).string());
  ASSERT_EQ(first.code, 0) << first.output;
  ASSERT_TRUE(fs::exists(straight / "out" / "checkpoint-4"));

  // The second run starts from a copy of checkpoint-4 only and finishes the last 4 steps.
  fs::create_directories(resumed / "out");
  fs::copy(straight / "out" / "checkpoint-4", resumed / "out" / "checkpoint-4", fs::copy_options::recursive);
  overrides["resume_from_checkpoint"] = "latest";
  const RunResult second = sdtrain("--config " + write_config(resumed, overrides).string());
  ASSERT_EQ(second.code, 0) << second.output;
  EXPECT_NE(second.output.find("resuming from"), std::string::npos) << second.output;
  expect_same_weights(straight / "out", resumed / "out");
}

TEST(TrainResume, EightStepsStraightEqualFourResumeFour) {
  expect_resume_is_exact({{"with_prior_preservation", true}, {"num_class_images", 4}, {"lr_scheduler", "linear"}});
}

TEST(TrainResume, ExactWithTheEightBitOptimizerEmaAndTextEncoder) {
  expect_resume_is_exact({{"optimizer", "adamw8bit"},
                          {"use_ema", true},
                          {"train_text_encoder", true},
                          {"random_flip", true},
                          {"center_crop", false},
                          {"offset_noise", true}});
}

TEST(TrainResume, ExactInLoRAModeWithEmaAndTheTextEncoder) {
  expect_resume_is_exact({{"train_mode", "lora"},
                          {"train_text_encoder", true},
                          {"use_ema", true},
                          {"optimizer", "adamw8bit"},
                          {"with_prior_preservation", true},
                          {"num_class_images", 4}});
}

// Lean mode (docs/memory.md): bf16 weights rounded stochastically by adamw8bit, fused steps.
// The rounding bits come from (seed, parameter, step), so a resume draws what it would have.
TEST(TrainResume, ExactInLeanModeWithFusedStepsAndTheTextEncoder) {
  expect_resume_is_exact({{"weight_dtype", "bf16"},
                          {"mixed_precision", "bf16"},
                          {"optimizer", "adamw8bit"},
                          {"fused_backward_pass", true},
                          {"max_grad_norm", 0},
                          {"train_text_encoder", true},
                          {"with_prior_preservation", true},
                          {"num_class_images", 4}});
}

// Channels-last convolution weights (compute.channels_last): 8-bit AdamW's flat states follow
// their NHWC storage order, and the resumed weights must come back in that layout.
TEST(TrainResume, ExactWithChannelsLastWeightsAndTheEightBitOptimizer) {
  expect_resume_is_exact({{"channels_last", true},
                          {"optimizer", "adamw8bit"},
                          {"with_prior_preservation", true},
                          {"num_class_images", 4}});
}

// fused_backward_pass changes nothing where nothing needs every gradient at once: the demo's
// ten steps with prior preservation, the text encoder, EMA and gradient checkpointing (whose
// recomputation runs inside the backward pass the hooks step from) give the same bits.
class FusedBackwardPass : public ::testing::TestWithParam<std::string> {};

TEST_P(FusedBackwardPass, TenStepsEqualTheUnfusedRunBitForBit) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  nlohmann::json settings = {{"optimizer", GetParam()},       {"max_grad_norm", 0},
                             {"train_text_encoder", true},    {"use_ema", true},
                             {"gradient_checkpointing", true}, {"with_prior_preservation", true},
                             {"num_class_images", 4}};
  fs::create_directories(dir / "fused");
  fs::create_directories(dir / "unfused");
  settings["fused_backward_pass"] = true;
  const RunResult fused = sdtrain("--config " + write_config(dir / "fused", settings).string());
  ASSERT_EQ(fused.code, 0) << fused.output;
  EXPECT_NE(fused.output.find("fused_backward_pass on"), std::string::npos) << fused.output;
  settings["fused_backward_pass"] = false;
  const RunResult unfused = sdtrain("--config " + write_config(dir / "unfused", settings).string());
  ASSERT_EQ(unfused.code, 0) << unfused.output;
  EXPECT_NE(unfused.output.find("fused_backward_pass off"), std::string::npos) << unfused.output;
  expect_same_weights(dir / "fused" / "out", dir / "unfused" / "out");
}

INSTANTIATE_TEST_SUITE_P(Optimizers, FusedBackwardPass, ::testing::Values("adamw", "adamw8bit"));

TEST(FusedBackwardPass, RefusedWithGradientAccumulationExit1) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const RunResult run = sdtrain("--dry-run --config " +
                                write_config(dir, {{"fused_backward_pass", true}, {"gradient_accumulation_steps", 2}})
                                    .string());
  EXPECT_EQ(run.code, 1) << run.output;
  EXPECT_NE(run.output.find("set gradient_accumulation_steps 1"), std::string::npos) << run.output;
}

TEST(TrainResume, RefusesToResumeWithChangedHyperparameters) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const RunResult first = sdtrain("--config " + write_config(dir, {{"max_steps", 3}, {"checkpointing_steps", 2}}).string());
  ASSERT_EQ(first.code, 0) << first.output;
  const RunResult second = sdtrain("--config " +
                             write_config(dir, {{"max_steps", 6}, {"learning_rate", 1e-3}, {"resume_from_checkpoint", "latest"}})
                                 .string());
  EXPECT_EQ(second.code, 1) << second.output;
  EXPECT_NE(second.output.find("learning_rate"), std::string::npos) << second.output;
}

TEST(TrainOutput, RefusesAnOutputDirHoldingAnotherRunUnlessOverwrite) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {{"max_steps", 2}});
  ASSERT_EQ(sdtrain("--config " + config.string()).code, 0);
  const RunResult again = sdtrain("--config " + config.string());
  EXPECT_EQ(again.code, 1);
  EXPECT_NE(again.output.find("--overwrite"), std::string::npos) << again.output;
  EXPECT_EQ(sdtrain("--config " + config.string() + " --overwrite").code, 0);
}

TEST(TrainOutput, DivergenceStopsWithExitCode6) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {{"max_steps", 30}, {"learning_rate", 1e12}});
  const RunResult run = sdtrain("--config " + config.string());
  EXPECT_EQ(run.code, 6) << run.output;
  EXPECT_NE(run.output.find("diverged"), std::string::npos) << run.output;
  EXPECT_FALSE(fs::exists(dir / "out" / "model_index.json"));
}

using sdtrain::testing::run_and_terminate;

TEST(TrainInterrupt, SigtermSavesACheckpointAndExits143) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = write_config(dir, {{"max_steps", 100000}});
  const fs::path metrics = dir / "out" / "logs" / "metrics.jsonl";
  const int status =
      run_and_terminate(dir, config, [&] { return fs::exists(metrics) && fs::file_size(metrics) > 200; });
  ASSERT_TRUE(WIFEXITED(status)) << file_bytes(dir / "log.txt");
  EXPECT_EQ(WEXITSTATUS(status), 143) << file_bytes(dir / "log.txt");
  std::ifstream lines(metrics);
  std::string line, last;
  while (std::getline(lines, line)) last = line;
  const int64_t step = nlohmann::json::parse(last)["step"].get<int64_t>();
  EXPECT_TRUE(fs::exists(dir / "out" / ("checkpoint-" + std::to_string(step) + "/trainer_state.json")))
      << file_bytes(dir / "log.txt");
  // ... and the run resumes from it.
  const RunResult resumed = sdtrain("--config " + config.string() + " --set max_steps=" + std::to_string(step + 2) +
                              " --set resume_from_checkpoint=latest");
  EXPECT_EQ(resumed.code, 0) << resumed.output;
}

}  // namespace

namespace {

TEST(TrainInterrupt, DuringClassImagesTheSameCommandGeneratesTheRestAndTrains) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path classes = dir / "generated_classes";
  const fs::path config = write_config(dir, {{"with_prior_preservation", true},
                                             {"class_data_dir", classes.string()},
                                             {"num_class_images", 24},
                                             {"sample_batch_size", 1},
                                             {"prior_generation_steps", 10},
                                             {"max_steps", 2}});
  const int status = run_and_terminate(dir, config, [&] { return fs::exists(classes / "class-000000.png"); });
  ASSERT_TRUE(WIFEXITED(status)) << file_bytes(dir / "log.txt");
  EXPECT_EQ(WEXITSTATUS(status), 143) << file_bytes(dir / "log.txt");
  int64_t written = 0;
  for (const auto& entry : fs::directory_iterator(classes)) written += entry.path().extension() == ".png";
  EXPECT_GE(written, 1);
  EXPECT_LT(written, 24) << "the run finished before SIGTERM arrived";
  // No checkpoint and no training step yet: the same command simply carries on.
  const RunResult again = sdtrain("--config " + config.string());
  ASSERT_EQ(again.code, 0) << again.output;
  EXPECT_NE(again.output.find("generating " + std::to_string(24 - written)), std::string::npos) << again.output;
  EXPECT_TRUE(fs::exists(classes / "class-000023.png"));
}

}  // namespace
