#pragma once
// diffusers DDIMScheduler (Song et al. 2020) with eta = 0, as StableDiffusionPipeline runs it:
// deterministic steps x_prev = sqrt(ac_prev) x0 + sqrt(1 - ac_prev) eps.

#include "sdtrain/schedulers/sampler.h"

namespace sdtrain::schedulers {

class DDIMScheduler : public Sampler {
 public:
  // Class defaults for absent keys: timestep_spacing leading, set_alpha_to_one true,
  // clip_sample true (clip_sample_range 1).
  explicit DDIMScheduler(const SchedulerConfig& config);

  std::string name() const override { return "ddim"; }
  std::string class_name() const override { return "DDIMScheduler"; }
  void set_timesteps(int64_t num_inference_steps, torch::Device device = torch::kCPU) override;
  torch::Tensor step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                     const std::vector<at::Generator>& generators = {}) override;

 private:
  std::string spacing_;
  bool clip_sample_;
  // alphas_cumprod "before" the first training step: 1, or ac[0] when set_alpha_to_one is false.
  torch::Tensor final_alpha_cumprod_;
  std::vector<int64_t> timestep_values_;
};

}  // namespace sdtrain::schedulers
