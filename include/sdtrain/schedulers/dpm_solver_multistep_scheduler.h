#pragma once
// diffusers DPMSolverMultistepScheduler as DPM-Solver++(2M) (Lu et al. 2022): data prediction,
// second order multistep with the midpoint form, first order on the first and the last step
// (final sigma zero), optionally on Karras sigmas.

#include "sdtrain/schedulers/sampler.h"

namespace sdtrain::schedulers {

class DPMSolverMultistepScheduler : public Sampler {
 public:
  // use_karras_sigmas: std::nullopt takes the file's key (default false). Class default for an
  // absent timestep_spacing: linspace. Other variants of the class (algorithm_type other than
  // dpmsolver++, solver_order other than 2, heun, lu lambdas, exponential/beta/flow sigmas,
  // final sigma_min, lambda_min_clipped, learned variance) are a ModelError naming the key.
  explicit DPMSolverMultistepScheduler(const SchedulerConfig& config, std::optional<bool> use_karras_sigmas = std::nullopt);

  std::string name() const override { return karras_ ? "dpm++2m_karras" : "dpm++2m"; }
  std::string class_name() const override { return "DPMSolverMultistepScheduler"; }
  void set_timesteps(int64_t num_inference_steps, torch::Device device = torch::kCPU) override;
  torch::Tensor step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                     const std::vector<at::Generator>& generators = {}) override;

 private:
  torch::Tensor predicted_original_sample(const torch::Tensor& model_output, const torch::Tensor& sample,
                                          int64_t step_index) const;
  torch::Tensor first_order_update(const torch::Tensor& x0, const torch::Tensor& sample, int64_t step_index) const;
  torch::Tensor second_order_update(const torch::Tensor& sample, int64_t step_index) const;

  std::string spacing_;
  bool karras_;
  torch::Tensor previous_x0_;  // the data prediction of the previous step
  torch::Tensor current_x0_;
  int64_t lower_order_nums_ = 0;
};

}  // namespace sdtrain::schedulers
