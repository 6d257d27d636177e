// The loss piece (include/sdtrain/train/diffusion_loss.h):
//  * LossInputSampler draws a micro-batch's random inputs in the order docs/training.md
//    documents (crops and flips, posterior sample, noise, offset noise, timesteps), all from
//    the run's one generator, so that a resumed run draws the same numbers;
//  * on CUDA, a draw and DiffusionLoss run under CUDA's sync debug mode set to "error" (the C++
//    side of torch.cuda.set_sync_debug_mode("error")): any operation that waits throws.
//    That is what makes the loss capturable as a CUDA graph. Skipped, with the reason,
//    without a GPU.
#include "sdtrain/train/diffusion_loss.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <regex>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/train/dataset.h"
#include "sdtrain/train/instance_data.h"
#include "sdtrain/train/run_setup.h"
#include "sdtrain/train/trained_set.h"
#include "sync_debug.h"
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

PromptConditioning demo_prompts(TrainingModels& models, const TrainConfig& config,
                                torch::Device device) {
  return PromptConditioning(models.text_encoder,
                            models.tokenizer.encode_batch({config.data.instance_prompt}),
                            models.tokenizer.encode_batch({config.class_images.class_prompt}),
                            config.train_text_encoder, device);
}

// The demo's models and data on the CPU in fp32, with a sampler drawing from `generator`.
struct CpuSampler {
  CpuSampler(TrainConfig run_config, uint64_t seed)
      : config(std::move(run_config)),
        models(load_training_models(io::ModelFolder(config.pretrained_model_name_or_path), config,
                                    torch::kCPU, Precision::fp32)),
        data(demo_dataset(config)),
        generator(at::make_generator<at::CPUGeneratorImpl>(seed)),
        sampler(data, models.vae,
                LossInputSampler::options_for(config, 1000, torch::kFloat, torch::kCPU),
                generator) {}
  DiffusionLoss loss(models::AutoencoderKL vae) {
    return DiffusionLoss(models.schedule, models.unet, demo_prompts(models, config, torch::kCPU),
                         DiffusionLoss::options_for(config, Precision::fp32, torch::kCPU),
                         std::move(vae));
  }

  TrainConfig config;
  TrainingModels models;
  DreamBoothDataset data;
  at::Generator generator;
  LossInputSampler sampler;
};

// Without cache_latents the sampler draws the posterior's N(0, 1) and leaves the encode to the
// loss: together they must give what encoding in the sampler gave, bit for bit.
TEST(LossInputSampler, DrawsInTheDocumentedOrderFromTheRunsGenerator) {
  CpuSampler demo(demo_config(), 11);
  const LossInputs drawn = demo.sampler.draw({2, 0});

  at::Generator replay = at::make_generator<at::CPUGeneratorImpl>(11);
  torch::NoGradGuard no_grad;
  models::AutoencoderKL& vae = demo.models.vae;
  const torch::Tensor pixels = demo.data.batch({2, 0}, replay);
  const torch::Tensor latents = vae->encode(pixels).sample(replay) * vae->config().scaling_factor;
  torch::Tensor noise = at::randn(latents.sizes(), replay, latents.options());
  noise = noise + 0.1 * at::randn({2, latents.size(1), 1, 1}, replay, latents.options());
  const torch::Tensor timesteps =
      at::randint(0, 1000, {2}, replay, torch::TensorOptions().dtype(torch::kLong));
  EXPECT_FALSE(drawn.latents.defined());
  EXPECT_TRUE(torch::equal(drawn.pixels, pixels));
  EXPECT_TRUE(torch::equal(drawn.noise, noise));
  EXPECT_TRUE(torch::equal(drawn.timesteps, timesteps));
  // The shared generator moved on exactly as far as the replay did.
  EXPECT_TRUE(torch::equal(demo.generator.get_state(), replay.get_state()));

  EXPECT_TRUE(torch::equal(demo.loss(vae)(drawn).latents, latents));
  EXPECT_THROW((void)demo.loss(models::AutoencoderKL(nullptr))(drawn), c10::Error);
}

// With cache_latents the sampler draws from the cached posteriors: the latents come with the
// inputs, and the loss uses them as they are.
TEST(LossInputSampler, CachedLatentsComeWithTheInputs) {
  TrainConfig config = demo_config();
  config.data.cache_latents = true;
  CpuSampler demo(config, 3);
  ::testing::internal::CaptureStderr();
  demo.sampler.cache_latents();
  // The log line gives the encodes' time, a part of the time to the first step.
  const std::string log = ::testing::internal::GetCapturedStderr();
  EXPECT_TRUE(std::regex_search(
      log, std::regex("cache_latents: encoded [0-9]+ images once in [0-9.e-]+ s")))
      << log;
  const LossInputs drawn = demo.sampler.draw({1, 0});
  ASSERT_TRUE(drawn.latents.defined());
  EXPECT_FALSE(drawn.pixels.defined());
  EXPECT_FALSE(drawn.posterior_noise.defined());
  EXPECT_EQ(drawn.latents.sizes(), drawn.noise.sizes());
  const LossOutput output = demo.loss(models::AutoencoderKL(nullptr))(drawn);
  EXPECT_TRUE(output.latents.is_same(drawn.latents));
  EXPECT_TRUE(std::isfinite(output.loss.item<double>()));
}

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
  LossInputSampler sampler(
      data, models.vae,
      LossInputSampler::options_for(config, models.schedule.num_train_timesteps(),
                                    models.frozen_dtype, cuda),
      generator);
  // Without cache_latents: the VAE encode is part of the loss, and must not synchronise either.
  DiffusionLoss loss(models.schedule, models.unet, demo_prompts(models, config, cuda),
                     DiffusionLoss::options_for(config, Precision::fp16, cuda), models.vae);
  // First calls pick kernels, create library handles and fill the pinned-memory cache.
  (void)loss(sampler.draw({0}));
  torch::cuda::synchronize();
  torch::Tensor value;
  try {
    sdtrain::testing::SyncDebugError error_on_sync;
    // The draw too: its copies (images, posterior draw, noise, timesteps) leave pinned memory
    // without waiting for the GPU.
    const LossInputs inputs = sampler.draw({1});
    value = loss(inputs).loss;
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
