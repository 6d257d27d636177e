#pragma once
// diffusers EulerAncestralDiscreteScheduler: an Euler step down to sigma_down followed by fresh
// noise of standard deviation sigma_up, drawn from the caller's generators (so a CPU generator
// gives the same images as diffusers with that generator).

#include "sdtrain/schedulers/sampler.h"

namespace sdtrain::schedulers {

class EulerAncestralDiscreteScheduler : public Sampler {
 public:
  // Class default for an absent timestep_spacing: linspace.
  explicit EulerAncestralDiscreteScheduler(const SchedulerConfig& config);

  std::string name() const override { return "euler_a"; }
  std::string class_name() const override { return "EulerAncestralDiscreteScheduler"; }
  void set_timesteps(int64_t num_inference_steps, torch::Device device = torch::kCPU) override;
  double init_noise_sigma() const override;
  torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t step_index) override;
  torch::Tensor step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                     const std::vector<at::Generator>& generators = {}) override;

 private:
  std::string spacing_;
};

}  // namespace sdtrain::schedulers
