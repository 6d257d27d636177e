#pragma once
// The forward diffusion process of a scheduler config (diffusers DDPMScheduler, the training
// noise schedule): betas, alphas_cumprod, add_noise, the velocity target and the SNR that
// min-SNR weighting uses. Every sampler derives its sigmas from the same alphas_cumprod.

#include <torch/torch.h>

#include "sdtrain/schedulers/scheduler_config.h"

namespace sdtrain::schedulers {

// betas as diffusers builds them: float32 linspace (squared for scaled_linear), or the
// float64 cosine alpha-bar product cast to float32 for squaredcos_cap_v2, or trained_betas.
torch::Tensor make_betas(const SchedulerConfig& config);

class NoiseSchedule {
 public:
  explicit NoiseSchedule(const SchedulerConfig& config);

  const SchedulerConfig& config() const { return config_; }
  int64_t num_train_timesteps() const { return config_.num_train_timesteps; }
  PredictionType prediction_type() const { return config_.prediction_type; }
  // float32 [T] on the CPU: cumprod(1 - betas).
  const torch::Tensor& alphas_cumprod() const { return alphas_cumprod_; }
  const torch::Tensor& betas() const { return betas_; }

  // x_t = sqrt(ac[t]) x0 + sqrt(1 - ac[t]) noise, computed in x0's dtype on its device as
  // DDPMScheduler.add_noise does. timesteps: int64 [B].
  torch::Tensor add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                          const torch::Tensor& timesteps) const;
  // v = sqrt(ac[t]) noise - sqrt(1 - ac[t]) x0 (DDPMScheduler.get_velocity).
  torch::Tensor velocity(const torch::Tensor& x0, const torch::Tensor& noise,
                         const torch::Tensor& timesteps) const;
  // What the UNet is trained to predict: the noise, or the velocity for v_prediction.
  torch::Tensor training_target(const torch::Tensor& x0, const torch::Tensor& noise,
                                const torch::Tensor& timesteps) const;
  // SNR(t) = ac[t] / (1 - ac[t]) as float32 [B] on the timesteps' device, computed as
  // diffusers.training_utils.compute_snr does ((sqrt(ac) / sqrt(1 - ac))^2).
  torch::Tensor snr(const torch::Tensor& timesteps) const;

  // A copy whose tables live on `device`, so that add_noise, training_target and snr index
  // them there without a host round trip (the training loss never synchronises; see
  // docs/architecture.md). Values are the CPU-computed ones, moved unchanged.
  NoiseSchedule on(torch::Device device) const;

 private:
  // sqrt(ac[t]) and sqrt(1 - ac[t]) in `like`'s dtype/device, shaped [B, 1, 1, ...].
  std::pair<torch::Tensor, torch::Tensor> coefficients(const torch::Tensor& timesteps,
                                                       const torch::Tensor& like) const;

  SchedulerConfig config_;
  torch::Tensor betas_;
  torch::Tensor alphas_cumprod_;
  torch::Tensor snr_;  // float32 [T], SNR of every timestep, on the same device as alphas_cumprod_
};

}  // namespace sdtrain::schedulers
