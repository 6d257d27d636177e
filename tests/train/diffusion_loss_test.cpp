// The loss piece (include/sdtrain/train/diffusion_loss.h):
//  * LossInputSampler draws a micro-batch's random inputs in the order docs/training.md
//    documents (crops and flips, posterior sample, noise, offset noise, timesteps), all from
//    the run's one generator, so that a resumed run draws the same numbers;
//  * on CUDA, DiffusionLoss runs under CUDA's sync debug mode set to "error" (the C++ side of
//    torch.cuda.set_sync_debug_mode("error")): any operation that waits for the host throws.
//    That is what makes the loss capturable as a CUDA graph. Skipped, with the reason,
//    without a GPU.
#include <gtest/gtest.h>
#include <torch/torch.h>

#if SDTRAIN_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "sdtrain/io/model_folder.h"
#include "sdtrain/train/dataset.h"
#include "sdtrain/train/diffusion_loss.h"
#include "sdtrain/train/instance_data.h"
#include "sdtrain/train/run_setup.h"
#include "sdtrain/train/trained_set.h"
#include "train_support.h"

namespace sdtrain::train {
namespace {

using testing::demo;

TrainConfig demo_config() {
  TrainConfig config;
  config.pretrained_model_name_or_path = (demo() / "model").string();
  config.data.instance_prompt = "a photo of sks robot";
  config.class_images.class_prompt = "a photo of a robot";
  config.data.resolution = 64;
  config.data.random_flip = true;
  config.loss.offset_noise = true;
  return config;
}

DreamBoothDataset demo_dataset(const TrainConfig& config) {
  const auto photos = list_images(demo() / "instance");
  // The photos double as class images: only the pairing matters here, not their content.
  return DreamBoothDataset(
      photos,
      config.class_images.with_prior_preservation ? photos : std::vector<std::filesystem::path>{},
      preprocess_options(config));
}

TEST(LossInputSampler, DrawsInTheDocumentedOrderFromTheRunsGenerator) {
  const TrainConfig config = demo_config();
  TrainingModels models = load_training_models(
      io::ModelFolder(config.pretrained_model_name_or_path), config, torch::kCPU, Precision::fp32);
  const DreamBoothDataset data = demo_dataset(config);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(11);
  LossInputSampler sampler(data, models.vae,
                           LossInputSampler::options_for(config, 1000, torch::kFloat, torch::kCPU),
                           generator);
  const LossInputs drawn = sampler.draw({2, 0});

  at::Generator replay = at::make_generator<at::CPUGeneratorImpl>(11);
  torch::NoGradGuard no_grad;
  const torch::Tensor pixels = data.batch({2, 0}, replay);
  const torch::Tensor latents =
      models.vae->encode(pixels).sample(replay) * models.vae->config().scaling_factor;
  torch::Tensor noise = at::randn(latents.sizes(), replay, latents.options());
  noise = noise + 0.1 * at::randn({2, latents.size(1), 1, 1}, replay, latents.options());
  const torch::Tensor timesteps =
      at::randint(0, 1000, {2}, replay, torch::TensorOptions().dtype(torch::kLong));
  EXPECT_TRUE(torch::equal(drawn.latents, latents));
  EXPECT_TRUE(torch::equal(drawn.noise, noise));
  EXPECT_TRUE(torch::equal(drawn.timesteps, timesteps));
  // The shared generator moved on exactly as far as the replay did.
  EXPECT_TRUE(torch::equal(generator.get_state(), replay.get_state()));
}

#if SDTRAIN_WITH_CUDA
// Sets the sync debug mode for its lifetime, and back to off after, even when the body throws.
class SyncDebugMode {
 public:
  explicit SyncDebugMode(c10::cuda::SyncDebugMode mode) {
    c10::cuda::warning_state().set_sync_debug_mode(mode);
  }
  ~SyncDebugMode() {
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  }
};
#endif

class LossOnCuda : public ::testing::TestWithParam<bool> {};

TEST_P(LossOnCuda, NeverSynchronisesWithTheHost) {
#if !SDTRAIN_WITH_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  TrainConfig config = demo_config();
  config.train_text_encoder = GetParam();
  config.class_images.with_prior_preservation = true;
  config.loss.snr_gamma = 5.0;
  config.compute.gradient_checkpointing = true;
  const torch::Device cuda(torch::kCUDA);
  TrainingModels models = load_training_models(
      io::ModelFolder(config.pretrained_model_name_or_path), config, cuda, Precision::fp16);
  const TrainedSet trained(models.pipeline_modules(), trained_component_names(config));
  const DreamBoothDataset data = demo_dataset(config);
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(5);
  PromptConditioning prompts(
      models.text_encoder, models.tokenizer.encode_batch({config.data.instance_prompt}),
      models.tokenizer.encode_batch({config.class_images.class_prompt}), GetParam(), cuda);
  LossInputSampler sampler(
      data, models.vae,
      LossInputSampler::options_for(config, models.schedule.num_train_timesteps(),
                                    models.frozen_dtype, cuda),
      generator);
  DiffusionLoss loss(models.schedule, models.unet, std::move(prompts),
                     DiffusionLoss::options_for(config, Precision::fp16, cuda));
  const LossInputs warm_up = sampler.draw({0});  // the host side may synchronise
  (void)loss(warm_up);  // first calls pick kernels and create library handles
  const LossInputs inputs = sampler.draw({1});
  torch::cuda::synchronize();
  torch::Tensor value;
  try {
    SyncDebugMode error_on_sync(c10::cuda::SyncDebugMode::L_ERROR);
    value = loss(inputs);
    // The detector is live: reading the loss back to the host is a synchronisation.
    EXPECT_THROW((void)value.item<double>(), c10::Error);
  } catch (const c10::Error& e) {
    FAIL() << "the loss synchronised with the host: " << e.what_without_backtrace();
  }
  ASSERT_TRUE(value.defined());
  EXPECT_EQ(value.device().type(), torch::kCUDA);
  EXPECT_TRUE(std::isfinite(value.item<double>()));
  EXPECT_EQ(value.requires_grad(), true);
#endif
}

INSTANTIATE_TEST_SUITE_P(TextEncoder, LossOnCuda, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "Trained" : "Frozen"; });

}  // namespace
}  // namespace sdtrain::train
