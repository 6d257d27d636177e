#include "sdtrain/train/diffusion_loss.h"

#include "sdtrain/train/device_memory.h"
#include "sdtrain/util/log.h"
#include "sdtrain/util/progress.h"

namespace sdtrain::train {

LossInputSampler::Options LossInputSampler::options_for(const TrainConfig& config,
                                                        int64_t num_train_timesteps,
                                                        c10::ScalarType vae_dtype,
                                                        torch::Device device) {
  Options options;
  options.cache_latents = config.data.cache_latents;
  options.offset_noise = config.loss.offset_noise;
  options.prior_preservation = config.class_images.with_prior_preservation;
  options.num_train_timesteps = num_train_timesteps;
  options.vae_dtype = vae_dtype;
  options.device = device;
  return options;
}

namespace {

// Host tensors on their way to `device`: drawn into pinned memory when it is a GPU, so the copy
// is queued without the host waiting for the device (docs/performance.md). The caching host
// allocator keeps each block until its copy has run.
torch::TensorOptions staging(const torch::TensorOptions& options, const torch::Device& device) {
  return options.device(torch::kCPU).pinned_memory(device.is_cuda());
}

torch::Tensor to_device(const torch::Tensor& host, const torch::Device& device) {
  return host.to(device, /*non_blocking=*/device.is_cuda());
}

}  // namespace

LossInputSampler::LossInputSampler(const DreamBoothDataset& data, models::AutoencoderKL vae,
                                   Options options, at::Generator generator)
    : data_(data), vae_(std::move(vae)), options_(options), generator_(std::move(generator)) {}

void LossInputSampler::cache_latents() {
  if (!options_.cache_latents) return;
  torch::NoGradGuard no_grad;
  const auto started = std::chrono::steady_clock::now();
  auto encode = [&](const torch::Tensor& resized, std::vector<CachedPosterior>& cache) {
    const torch::Tensor pixels = augment(resized, data_.options(), generator_).unsqueeze(0);
    auto posterior = vae_->encode(pixels.to(options_.device, options_.vae_dtype));
    cache.push_back({posterior.mean, posterior.std});
  };
  for (int64_t i = 0; i < data_.num_instance_images(); ++i) {
    encode(data_.resized_instance(i), cached_instance_);
  }
  for (int64_t i = 0; i < data_.num_class_images(); ++i) {
    encode(data_.resized_class(i), cached_class_);
  }
  // Once per run, before the first step: the wait makes the time the encodes' own, a part of
  // the time to the first step (docs/benchmarks.md).
  synchronize_device(options_.device);
  log::info(log::str("cache_latents: encoded ", cached_instance_.size() + cached_class_.size(),
                     " images once in ", format_number(seconds_since(started), 3), " s"));
}

torch::Tensor LossInputSampler::sample_cached(const std::vector<int64_t>& indices) {
  // Sample i pairs photo i mod n with class image i mod m (the dataset's pairing).
  std::vector<torch::Tensor> means, stds;
  auto add = [&](const CachedPosterior& cached) {
    means.push_back(cached.mean);
    stds.push_back(cached.std);
  };
  for (int64_t i : indices) add(cached_instance_[i % cached_instance_.size()]);
  if (options_.prior_preservation) {
    for (int64_t i : indices) add(cached_class_[i % cached_class_.size()]);
  }
  const torch::Tensor mean = torch::cat(means);
  const torch::Tensor noise = to_device(
      at::randn(mean.sizes(), generator_, staging(mean.options(), options_.device)),
      options_.device);
  return mean + torch::cat(stds) * noise;
}

void LossInputSampler::draw_x0(const std::vector<int64_t>& indices, LossInputs& inputs) {
  const double scaling_factor = vae_->config().scaling_factor;
  if (options_.cache_latents) {
    torch::NoGradGuard no_grad;
    inputs.latents = sample_cached(indices) * scaling_factor;
    return;
  }
  const torch::Device device = options_.device;
  // Cast on the host (the same rounding as on the device) and copied without waiting.
  torch::Tensor pixels = data_.batch(indices, generator_).to(options_.vae_dtype);
  if (device.is_cuda()) pixels = pixels.pin_memory();
  inputs.pixels = to_device(pixels, device);
  // The posterior's draw in its moments' shape and dtype, as DiagonalGaussianDistribution's
  // sample(generator) draws it, so the numbers are those of encode(pixels).sample(generator).
  const int64_t f = vae_->config().downsampling_factor();
  const std::vector<int64_t> shape = {pixels.size(0), vae_->config().latent_channels,
                                      pixels.size(2) / f, pixels.size(3) / f};
  inputs.posterior_noise = to_device(
      at::randn(shape, generator_, staging(torch::TensorOptions(options_.vae_dtype), device)),
      device);
}

LossInputs LossInputSampler::draw(const std::vector<int64_t>& indices) {
  // With cache_latents the crops and flips were drawn once, when the latents were cached.
  LossInputs inputs;
  draw_x0(indices, inputs);
  const torch::Device device = options_.device;
  const torch::Tensor& like = inputs.latents.defined() ? inputs.latents : inputs.posterior_noise;
  // The noise in the latents' dtype: the VAE's (the encode's result, or the cached posterior).
  const auto host = staging(like.options(), device);
  inputs.noise = to_device(at::randn(like.sizes(), generator_, host), device);
  if (options_.offset_noise) {
    // diffusers' offset noise: 0.1 × N(0,1) per sample and channel.
    const torch::Tensor offset = at::randn({like.size(0), like.size(1), 1, 1}, generator_, host);
    inputs.noise = inputs.noise + 0.1 * to_device(offset, device);
  }
  inputs.timesteps =
      to_device(at::randint(0, options_.num_train_timesteps, {like.size(0)}, generator_,
                            staging(torch::TensorOptions().dtype(torch::kLong), device)),
                device);
  return inputs;
}

PromptConditioning::PromptConditioning(models::CLIPTextModel text_encoder,
                                       const torch::Tensor& instance_ids,
                                       const torch::Tensor& class_ids, bool trained,
                                       torch::Device device)
    : text_encoder_(std::move(text_encoder)), trained_(trained) {
  instance_ = instance_ids.to(device);
  if (class_ids.defined()) class_ = class_ids.to(device);
  if (trained_) return;
  // A frozen encoder maps each prompt to the same embedding every step: once is enough.
  torch::NoGradGuard no_grad;
  instance_ = text_encoder_->forward(instance_);
  if (class_.defined()) class_ = text_encoder_->forward(class_);
}

torch::Tensor PromptConditioning::embeddings(int64_t instance_samples) {
  auto repeat = [&](const torch::Tensor& prompt) {
    return trained_ ? prompt.expand({instance_samples, -1})
                    : prompt.expand({instance_samples, -1, -1});
  };
  torch::Tensor batch = repeat(instance_);
  if (class_.defined()) batch = torch::cat({batch, repeat(class_)});
  return trained_ ? text_encoder_->forward(batch) : batch;
}

DiffusionLoss::Options DiffusionLoss::options_for(const TrainConfig& config, Precision precision,
                                                  torch::Device device) {
  Options options;
  options.prior_preservation = config.class_images.with_prior_preservation;
  options.cache_weight_casts = !config.compute.gradient_checkpointing;
  options.prior_loss_weight = config.class_images.prior_loss_weight;
  options.snr_gamma = config.loss.snr_gamma;
  options.precision = precision;
  options.device = device;
  return options;
}

DiffusionLoss::DiffusionLoss(const schedulers::NoiseSchedule& schedule,
                             models::UNet2DConditionModel unet, PromptConditioning prompts,
                             Options options, models::AutoencoderKL vae)
    : schedule_(schedule.on(options.device)),
      unet_(std::move(unet)),
      prompts_(std::move(prompts)),
      options_(options),
      vae_(std::move(vae)) {}

torch::Tensor DiffusionLoss::x0(const LossInputs& inputs) {
  if (!inputs.pixels.defined()) return inputs.latents;
  TORCH_CHECK(!vae_.is_empty(), "DiffusionLoss: inputs given as pixels, but no VAE to encode them");
  torch::NoGradGuard no_grad;  // the VAE is frozen
  return vae_->encode(inputs.pixels).sample_from(inputs.posterior_noise) *
         vae_->config().scaling_factor;
}

torch::Tensor DiffusionLoss::instance_loss(const torch::Tensor& prediction,
                                           const torch::Tensor& target,
                                           const torch::Tensor& timesteps) const {
  if (!options_.snr_gamma) return torch::mse_loss(prediction, target);
  // Min-SNR-γ (Hang et al. 2023) as diffusers weights it, on the instance half only: the SNR
  // of the instance timesteps (diffusers uses all timesteps there, a known bug).
  const torch::Tensor snr = schedule_.snr(timesteps);
  torch::Tensor weights = torch::clamp_max(snr, *options_.snr_gamma);
  const bool velocity = schedule_.prediction_type() == schedulers::PredictionType::v_prediction;
  weights = velocity ? weights / (snr + 1) : weights / snr;
  const torch::Tensor per_sample =
      torch::mse_loss(prediction, target, at::Reduction::None).mean(std::vector<int64_t>{1, 2, 3});
  return (per_sample * weights.to(per_sample.device())).mean();
}

LossOutput DiffusionLoss::operator()(const LossInputs& inputs) {
  const torch::Tensor latents = x0(inputs);
  const torch::Tensor noisy = schedule_.add_noise(latents, inputs.noise, inputs.timesteps);
  const torch::Tensor target = schedule_.training_target(latents, inputs.noise, inputs.timesteps);
  const int64_t batch = latents.size(0);
  torch::Tensor prediction;
  {
    AutocastGuard autocast(options_.device.type(), options_.precision,
                           options_.cache_weight_casts);
    const torch::Tensor embeds =
        prompts_.embeddings(options_.prior_preservation ? batch / 2 : batch);
    prediction = unet_->forward(noisy, inputs.timesteps, embeds);
  }
  prediction = prediction.to(torch::kFloat);
  const torch::Tensor target32 = target.to(torch::kFloat);
  if (!options_.prior_preservation) {
    return {instance_loss(prediction, target32, inputs.timesteps), latents};
  }
  const auto predictions = prediction.chunk(2, 0);
  const auto targets = target32.chunk(2, 0);
  const torch::Tensor prior_loss = torch::mse_loss(predictions[1], targets[1]);
  const torch::Tensor loss =
      instance_loss(predictions[0], targets[0], inputs.timesteps.chunk(2, 0)[0]);
  return {loss + options_.prior_loss_weight * prior_loss, latents};
}

LossInputs LossInputs::map(const std::function<torch::Tensor(const torch::Tensor&)>& f) const {
  LossInputs mapped;
  for (auto field : kFields) {
    if ((this->*field).defined()) mapped.*field = f(this->*field);
  }
  return mapped;
}

}  // namespace sdtrain::train
