#pragma once
// diffusers PNDMScheduler with skip_prk_steps (Liu et al. 2022, PLMS only): linear multistep
// updates over the history of model outputs, the schedule Stable Diffusion folders ship with.

#include "sdtrain/schedulers/sampler.h"

namespace sdtrain::schedulers {

class PNDMScheduler : public Sampler {
 public:
  // Class defaults for absent keys: timestep_spacing leading, set_alpha_to_one false,
  // skip_prk_steps false. The Runge-Kutta warm-up (skip_prk_steps false) is not implemented:
  // that is a ConfigError naming the key; it is forced on when `force_skip_prk_steps` (the
  // "pndm" name, which means PLMS).
  explicit PNDMScheduler(const SchedulerConfig& config, bool force_skip_prk_steps = false);

  std::string name() const override { return "pndm"; }
  std::string class_name() const override { return "PNDMScheduler"; }
  // N + 1 timesteps for N >= 2: the second repeats the first (PLMS's warm-up takes two model
  // evaluations at the first timestep).
  void set_timesteps(int64_t num_inference_steps, torch::Device device = torch::kCPU) override;
  torch::Tensor step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                     const std::vector<at::Generator>& generators = {}) override;

 private:
  torch::Tensor previous_sample(const torch::Tensor& sample, int64_t timestep, int64_t prev_timestep,
                                torch::Tensor model_output) const;

  std::string spacing_;
  torch::Tensor final_alpha_cumprod_;
  std::vector<int64_t> timestep_values_;
  std::vector<torch::Tensor> ets_;  // the last four model outputs used by the multistep formula
  torch::Tensor cur_sample_;        // the sample of the first step, reused by the second
};

}  // namespace sdtrain::schedulers
