#pragma once
// The loss of one micro-batch, in two halves (docs/architecture.md):
//   LossInputSampler, on the host: draws the micro-batch's random inputs from the run's one
//     CPU generator, in the order docs/training.md documents, and puts them on the device;
//   DiffusionLoss, on the device: train_dreambooth.py's loss of those inputs (noise-prediction
//     or v-prediction MSE, prior preservation, min-SNR weighting). It never waits for the host,
//     so it is the piece a CUDA graph can capture.

#include <torch/torch.h>

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
  torch::Tensor latents;    // x0: VAE latents times the VAE's scaling factor, [B, 4, h, w]
  torch::Tensor noise;      // same shape; offset noise already added when enabled
  torch::Tensor timesteps;  // int64 [B]
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
  // Draws, in this order: crops and flips (unless cached), the posterior sample, the noise,
  // the offset noise (when enabled), the timesteps.
  LossInputs draw(const std::vector<int64_t>& indices);

 private:
  torch::Tensor latents_for(const std::vector<int64_t>& indices);
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
  DiffusionLoss(const schedulers::NoiseSchedule& schedule, models::UNet2DConditionModel unet,
                PromptConditioning prompts, Options options);

  // The scalar float32 loss of one micro-batch, on the device, with its autograd graph.
  torch::Tensor operator()(const LossInputs& inputs);

 private:
  torch::Tensor instance_loss(const torch::Tensor& prediction, const torch::Tensor& target,
                              const torch::Tensor& timesteps) const;

  schedulers::NoiseSchedule schedule_;
  models::UNet2DConditionModel unet_;
  PromptConditioning prompts_;
  Options options_;
};

}  // namespace sdtrain::train
