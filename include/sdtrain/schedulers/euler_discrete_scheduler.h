#pragma once
// diffusers EulerDiscreteScheduler (Karras et al. 2022, Algorithm 2 with s_churn = 0): the
// probability-flow ODE in sigma space, first order.

#include "sdtrain/schedulers/sampler.h"

namespace sdtrain::schedulers {

// The timesteps EulerDiscreteScheduler and EulerAncestralDiscreteScheduler place, descending,
// as float32 values (fractional with linspace spacing).
std::vector<float> euler_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps, int64_t offset);

class EulerDiscreteScheduler : public Sampler {
 public:
  // Class defaults for absent keys: timestep_spacing linspace, use_karras_sigmas false.
  // Keys this implementation does not reproduce (interpolation_type log_linear, exponential or
  // beta sigmas, continuous timesteps, final_sigmas_type sigma_min, sigma_min/max) are a
  // ModelError naming the key.
  explicit EulerDiscreteScheduler(const SchedulerConfig& config);

  std::string name() const override { return "euler"; }
  std::string class_name() const override { return "EulerDiscreteScheduler"; }
  void set_timesteps(int64_t num_inference_steps, torch::Device device = torch::kCPU) override;
  // max sigma for linspace/trailing spacing, sqrt(max sigma^2 + 1) for leading (diffusers).
  double init_noise_sigma() const override;
  // sample / sqrt(sigma^2 + 1).
  torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t step_index) override;
  torch::Tensor step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                     const std::vector<at::Generator>& generators = {}) override;

 private:
  std::string spacing_;
  bool karras_;
};

// Throws ModelError unless every key of `keys` is absent, null or equal to its value in the
// scheduler config's JSON (features of a diffusers class this implementation does not have).
void require_default_keys(const SchedulerConfig& config, const std::string& class_name,
                          const std::vector<std::pair<std::string, nlohmann::json>>& keys);

}  // namespace sdtrain::schedulers
