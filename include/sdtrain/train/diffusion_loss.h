#pragma once
// The loss of one micro-batch, in two halves (docs/architecture.md):
//   LossInputSampler, on the host: draws the micro-batch's random inputs from the run's one
//     CPU generator, in the order docs/training.md documents, and puts them on the device;
//   DiffusionLoss, on the device: train_dreambooth.py's loss of those inputs (the VAE encode
//     without cache_latents, noise-prediction or v-prediction MSE, prior preservation, min-SNR
//     weighting). It never waits for the host, so it is the piece a CUDA graph can capture.

#include <torch/torch.h>

#include <array>
#include <functional>
#include <optional>
#include <vector>

#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/schedulers/noise_schedule.h"
#include "sdtrain/train/dataset.h"
#include "sdtrain/train/mixed_precision.h"
#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

// A micro-batch's random inputs, on the training device. With prior preservation the batch
// holds the instance samples first, then their class samples (diffusers' collate_fn).
struct LossInputs {
  // x0: VAE latents times the VAE's scaling factor, [B, 4, h, w]. With cache_latents only:
  // otherwise the loss encodes `pixels` on the device (below) and this stays undefined.
  torch::Tensor latents;
  torch::Tensor noise;      // [B, 4, h, w]; offset noise already added when enabled
  torch::Tensor timesteps;  // int64 [B]
  // Without cache_latents: the images, [B, 3, H, W] in [-1, 1] in the VAE's dtype, and the
  // posterior's N(0, 1) draw, [B, 4, h, w] in the same dtype. Encoding them is part of the
  // loss, so that a CUDA graph captures the VAE with the pass (micro_batch_pass.h).
  torch::Tensor pixels;
  torch::Tensor posterior_noise;

  int64_t rows() const { return noise.size(0); }
  // Every field, for what treats them alike: copies into a graph's buffers, a process's rows.
  static constexpr std::array<torch::Tensor LossInputs::*, 5> kFields = {
      &LossInputs::latents, &LossInputs::noise, &LossInputs::timesteps, &LossInputs::pixels,
      &LossInputs::posterior_noise};
  // f applied to every defined field; an undefined one stays undefined.
  LossInputs map(const std::function<torch::Tensor(const torch::Tensor&)>& f) const;
};

// What a pass of the loss gives: the loss, and the x0 latents it used (the encoded ones when
// the inputs gave pixels), which --dump-dir writes for the reference replay.
struct LossOutput {
  torch::Tensor loss;  // float32 scalar on the device
  torch::Tensor latents;
};

class LossInputSampler {
 public:
  struct Options {
    bool cache_latents = false;
    bool offset_noise = false;
    bool prior_preservation = false;
    int64_t num_train_timesteps = 1000;
    c10::ScalarType vae_dtype = torch::kFloat;
    torch::Device device = torch::kCPU;
  };
  static Options options_for(const TrainConfig& config, int64_t num_train_timesteps,
                             c10::ScalarType vae_dtype, torch::Device device);

  // `generator` is the run's generator (shared, not copied: checkpoints save its state).
  LossInputSampler(const DreamBoothDataset& data, models::AutoencoderKL vae, Options options,
                   at::Generator generator);

  // With cache_latents: encodes every photo and class image once (their crops and flips are
  // drawn now, in that order), so that draw() only samples the cached posteriors.
  void cache_latents();
  // Draws, in this order: crops and flips (unless cached), the posterior sample's N(0, 1), the
  // noise, the offset noise (when enabled), the timesteps. Without cache_latents the VAE's
  // work is left to the loss: the inputs carry the pixels and the posterior's draw.
  LossInputs draw(const std::vector<int64_t>& indices);

 private:
  // Sets `latents` (cached) or `pixels` and `posterior_noise`.
  void draw_x0(const std::vector<int64_t>& indices, LossInputs& inputs);
  torch::Tensor sample_cached(const std::vector<int64_t>& indices);

  struct CachedPosterior {
    torch::Tensor mean;
    torch::Tensor std;
  };
  const DreamBoothDataset& data_;
  models::AutoencoderKL vae_;
  Options options_;
  at::Generator generator_;
  std::vector<CachedPosterior> cached_instance_;  // per photo, with cache_latents
  std::vector<CachedPosterior> cached_class_;
};

// The prompt embeddings of a micro-batch: the instance prompt for the first half, the class
// prompt for the second.
class PromptConditioning {
 public:
  // A trained text encoder encodes the token ids in every forward pass; a frozen one encodes
  // the two prompts once, here (diffusers' --pre_compute_text_embeddings).
  PromptConditioning(models::CLIPTextModel text_encoder, const torch::Tensor& instance_ids,
                     const torch::Tensor& class_ids, bool trained, torch::Device device);
  torch::Tensor embeddings(int64_t instance_samples);

 private:
  models::CLIPTextModel text_encoder_;
  bool trained_;
  torch::Tensor instance_;  // token ids [1, 77] when trained, else embeddings [1, 77, D]
  torch::Tensor class_;     // likewise; undefined without prior preservation
};

class DiffusionLoss {
 public:
  struct Options {
    bool prior_preservation = false;
    double prior_loss_weight = 1.0;
    std::optional<double> snr_gamma;
    Precision precision = Precision::fp32;
    // Off under gradient checkpointing: no half copy of every weight held through the forward
    // (AutocastGuard, docs/memory.md).
    bool cache_weight_casts = true;
    torch::Device device = torch::kCPU;
  };
  static Options options_for(const TrainConfig& config, Precision precision, torch::Device device);

  // `schedule` is copied onto the device, so indexing its tables needs no host round trip.
  // `vae`: the frozen VAE that encodes inputs given as pixels (null with cache_latents).
  DiffusionLoss(const schedulers::NoiseSchedule& schedule, models::UNet2DConditionModel unet,
                PromptConditioning prompts, Options options,
                models::AutoencoderKL vae = models::AutoencoderKL(nullptr));

  // The scalar float32 loss of one micro-batch, on the device, with its autograd graph.
  LossOutput operator()(const LossInputs& inputs);

 private:
  // The inputs' x0: their latents, or the encode of their pixels (train_dreambooth.py's
  // vae.encode(pixel_values).latent_dist.sample() * scaling_factor, without gradients).
  torch::Tensor x0(const LossInputs& inputs);
  torch::Tensor instance_loss(const torch::Tensor& prediction, const torch::Tensor& target,
                              const torch::Tensor& timesteps) const;

  schedulers::NoiseSchedule schedule_;
  models::UNet2DConditionModel unet_;
  PromptConditioning prompts_;
  Options options_;
  models::AutoencoderKL vae_;
};

}  // namespace sdtrain::train
