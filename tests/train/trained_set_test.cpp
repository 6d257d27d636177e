// TrainedSet, the one owner of what a run trains (include/sdtrain/train/trained_set.h): it
// selects the parameters, names them for the optimizer, and its weights survive a checkpoint
// (save, then load into freshly loaded models) and the final export bit for bit, for the UNet
// alone and for the UNet with the text encoder. End to end: a run's checkpoint and exported
// model hold the text encoder's training exactly when the TrainedSet does.
#include "sdtrain/train/trained_set.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/train/run_setup.h"
#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;

namespace sdtrain::train {
namespace {

using testing::demo;

TrainConfig demo_config(bool train_text_encoder) {
  TrainConfig config;
  config.pretrained_model_name_or_path = (demo() / "model").string();
  config.train_text_encoder = train_text_encoder;
  return config;
}

TrainingModels load_demo(const TrainConfig& config) {
  return load_training_models(io::ModelFolder(config.pretrained_model_name_or_path), config,
                              torch::kCPU, Precision::fp32);
}

// Moves every trained weight away from the base model, as training would.
void perturb(const TrainedSet& trained, uint64_t seed) {
  torch::NoGradGuard no_grad;
  torch::manual_seed(seed);
  for (auto& parameter : trained.parameters()) parameter.add_(torch::randn_like(parameter) * 0.01);
}

void expect_identical(const io::NamedTensors& actual, const io::NamedTensors& expected) {
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].first, expected[i].first);
    EXPECT_TRUE(torch::equal(actual[i].second, expected[i].second)) << actual[i].first;
  }
}

class TrainedSetRoundTrip : public ::testing::TestWithParam<bool> {};

TEST_P(TrainedSetRoundTrip, SelectsNamesAndCountsTheTrainedParameters) {
  const TrainConfig config = demo_config(GetParam());
  TrainingModels models = load_demo(config);
  const TrainedSet trained(models.pipeline_modules(), trained_component_names(config));
  EXPECT_TRUE(trained.trains("unet"));
  EXPECT_EQ(trained.trains("text_encoder"), GetParam());
  EXPECT_FALSE(trained.trains("vae"));
  int64_t expected_count = models::parameter_count(*models.unet);
  if (GetParam()) expected_count += models::parameter_count(*models.text_encoder);
  int64_t count = 0;
  for (const auto& [name, parameter] : trained.named_parameters()) {
    const bool prefixed =
        name.starts_with("unet.") || (GetParam() && name.starts_with("text_encoder."));
    EXPECT_TRUE(prefixed) << name;
    EXPECT_TRUE(parameter.requires_grad()) << name;
    count += parameter.numel();
  }
  EXPECT_EQ(count, expected_count);
  EXPECT_EQ(trained.bytes(), 4 * expected_count);  // float32 master weights
  for (const auto& parameter : models.vae->parameters()) EXPECT_FALSE(parameter.requires_grad());
  for (const auto& parameter : models.text_encoder->parameters()) {
    EXPECT_EQ(parameter.requires_grad(), GetParam());
  }
  EXPECT_EQ(models.text_encoder->is_training(), GetParam());
}

TEST_P(TrainedSetRoundTrip, CheckpointRestoresEveryTrainedWeightExactly) {
  const TrainConfig config = demo_config(GetParam());
  const io::ModelFolder base(config.pretrained_model_name_or_path);
  TrainingModels models = load_demo(config);
  const TrainedSet trained(models.pipeline_modules(), trained_component_names(config));
  perturb(trained, 3);
  const fs::path dir =
      testing::scratch_dir() / ("trained-set-checkpoint-" + std::to_string(GetParam()));
  fs::remove_all(dir);
  trained.save(dir, base);
  EXPECT_TRUE(fs::exists(dir / "unet" / "config.json"));
  EXPECT_EQ(fs::exists(dir / "text_encoder" / "model.safetensors"), GetParam());
  EXPECT_FALSE(fs::exists(dir / "vae"));

  TrainingModels fresh = load_demo(config);
  TrainedSet restored(fresh.pipeline_modules(), trained_component_names(config));
  restored.load(dir, torch::kCPU);
  const auto expected = trained.named_parameters();
  const auto actual = restored.named_parameters();
  ASSERT_EQ(actual.size(), expected.size());
  for (size_t i = 0; i < actual.size(); ++i) {
    EXPECT_EQ(actual[i].first, expected[i].first);
    EXPECT_TRUE(torch::equal(actual[i].second, expected[i].second)) << actual[i].first;
  }
}

TEST_P(TrainedSetRoundTrip, ExportWritesTheTrainedWeightsAndTheBaseForTheRest) {
  const TrainConfig config = demo_config(GetParam());
  const io::ModelFolder base(config.pretrained_model_name_or_path);
  TrainingModels models = load_demo(config);
  const TrainedSet trained(models.pipeline_modules(), trained_component_names(config));
  perturb(trained, 5);
  const auto weights = trained.weights();
  EXPECT_EQ(weights.size(), GetParam() ? 2u : 1u);
  const fs::path out =
      testing::scratch_dir() / ("trained-set-export-" + std::to_string(GetParam()));
  fs::remove_all(out);
  exporter::PipelineExport job;
  job.base = &base;
  job.trained = weights;
  exporter::export_pipeline(job, out);

  const io::ModelFolder exported(out);
  const models::LoadOptions fp32{torch::kFloat, torch::kCPU};
  expect_identical(models::state_dict(*models::load_unet(exported, fp32)), weights.at("unet"));
  const auto text_encoder = models::state_dict(*models::load_text_encoder(exported, fp32));
  if (GetParam()) {
    expect_identical(text_encoder, weights.at("text_encoder"));
  } else {
    expect_identical(text_encoder, models::state_dict(*models::load_text_encoder(base, fp32)));
  }
}

INSTANTIATE_TEST_SUITE_P(UnetAndTextEncoder, TrainedSetRoundTrip, ::testing::Bool(),
                         [](const auto& info) {
                           return info.param ? "WithTextEncoder" : "UnetOnly";
                         });

// End to end: the checkpoint holds text_encoder/ exactly when it is trained, and the exported
// text encoder is the base one, byte for byte, when it is not.
TEST(TrainedSetRun, CheckpointAndExportFollowWhatIsTrained) {
  for (const bool text_encoder : {false, true}) {
    const fs::path dir =
        testing::scratch_dir() / ("trained-set-run-" + std::to_string(text_encoder));
    fs::remove_all(dir);
    fs::create_directories(dir);
    const fs::path config = testing::write_config(
        dir, {{"max_steps", 4}, {"checkpointing_steps", 2}, {"train_text_encoder", text_encoder}});
    const auto run = testing::run_sdtrain("--config " + config.string());
    ASSERT_EQ(run.code, 0) << run.output;
    EXPECT_TRUE(fs::exists(dir / "out" / "checkpoint-2" / "unet"));
    EXPECT_EQ(fs::exists(dir / "out" / "checkpoint-2" / "text_encoder"), text_encoder);
    const models::LoadOptions fp32{torch::kFloat, torch::kCPU};
    const auto exported = models::state_dict(*models::load_text_encoder(io::ModelFolder(dir / "out"), fp32));
    const auto original = models::state_dict(*models::load_text_encoder(io::ModelFolder(demo() / "model"), fp32));
    ASSERT_EQ(exported.size(), original.size());
    bool all_equal = true;
    for (size_t i = 0; i < exported.size(); ++i) {
      all_equal = all_equal && torch::equal(exported[i].second, original[i].second);
    }
    EXPECT_EQ(all_equal, !text_encoder);
  }
}

}  // namespace
}  // namespace sdtrain::train

namespace sdtrain::train {
namespace {

// docs/memory.md: the VAE (with cache_latents) and a frozen text encoder leave the GPU once
// their work is cached, and come back for validation. Skipped without a GPU.
TEST(FrozenModelsCuda, CachedOnesLeaveTheGpuAndComeBack) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  TrainConfig config = demo_config(false);
  config.data.cache_latents = true;
  TrainingModels models = load_training_models(io::ModelFolder(config.pretrained_model_name_or_path),
                                               config, torch::kCUDA, Precision::fp16);
  const auto moved = move_cached_frozen_models(models, config, torch::kCUDA, /*to_host=*/true);
  EXPECT_EQ(moved, (std::vector<std::string>{"vae", "text_encoder"}));
  EXPECT_TRUE(models.vae->parameters().front().device().is_cpu());
  EXPECT_TRUE(models.text_encoder->parameters().front().device().is_cpu());
  EXPECT_TRUE(models.unet->parameters().front().is_cuda());
  move_cached_frozen_models(models, config, torch::kCUDA, /*to_host=*/false);
  EXPECT_TRUE(models.vae->parameters().front().is_cuda());
  EXPECT_TRUE(models.text_encoder->parameters().front().is_cuda());
  // A trained text encoder and an uncached VAE stay.
  config.data.cache_latents = false;
  config.train_text_encoder = true;
  EXPECT_TRUE(move_cached_frozen_models(models, config, torch::kCUDA, true).empty());
}

}  // namespace
}  // namespace sdtrain::train
