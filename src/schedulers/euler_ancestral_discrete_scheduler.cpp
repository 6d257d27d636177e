#include "sdtrain/schedulers/euler_ancestral_discrete_scheduler.h"

#include "sdtrain/schedulers/euler_discrete_scheduler.h"
#include "sdtrain/schedulers/timestep_spacing.h"

namespace sdtrain::schedulers {

EulerAncestralDiscreteScheduler::EulerAncestralDiscreteScheduler(const SchedulerConfig& config)
    : Sampler(config), spacing_(config.timestep_spacing.value_or("linspace")) {}

void EulerAncestralDiscreteScheduler::set_timesteps(int64_t num_inference_steps, torch::Device device) {
  check_step_count(num_inference_steps);
  const auto placed = euler_timesteps(spacing_, config().num_train_timesteps, num_inference_steps,
                                      config().steps_offset);
  const std::vector<double> timesteps(placed.begin(), placed.end());
  std::vector<double> sigmas = interpolate_sigmas(timesteps, sigma_table(schedule_.alphas_cumprod()));
  sigmas.push_back(0.0);
  sigmas_ = to_float_tensor(sigmas);
  timesteps_ = to_float_tensor(timesteps).to(device);
}

double EulerAncestralDiscreteScheduler::init_noise_sigma() const {
  const torch::Tensor max_sigma = sigmas_.max();
  if (spacing_ == "linspace" || spacing_ == "trailing") return max_sigma.item<float>();
  return (max_sigma.pow(2) + 1).pow(0.5).item<float>();
}

torch::Tensor EulerAncestralDiscreteScheduler::scale_model_input(const torch::Tensor& sample, int64_t step_index) {
  const torch::Tensor sigma = sigmas_[step_index];
  return sample / (sigma.pow(2) + 1).pow(0.5);
}

torch::Tensor EulerAncestralDiscreteScheduler::step(const torch::Tensor& model_output, int64_t step_index,
                                                    const torch::Tensor& sample_in,
                                                    const std::vector<at::Generator>& generators) {
  expect_step(step_index);
  const torch::Tensor sigma = sigmas_[step_index];
  const torch::Tensor sample = sample_in.to(torch::kFloat32);
  torch::Tensor pred_original_sample;
  if (config().prediction_type == PredictionType::epsilon) {
    pred_original_sample = sample - sigma * model_output;
  } else {
    pred_original_sample = model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + (sample / (sigma.pow(2) + 1));
  }
  const torch::Tensor& sigma_from = sigma;
  const torch::Tensor sigma_to = sigmas_[step_index + 1];
  // Split the step so that the total variance matches sigma_to: deterministic down to
  // sigma_down, then noise of variance sigma_up^2 (k-diffusion's get_ancestral_step, eta = 1).
  const torch::Tensor sigma_up = (sigma_to.pow(2) * (sigma_from.pow(2) - sigma_to.pow(2)) / sigma_from.pow(2)).pow(0.5);
  const torch::Tensor sigma_down = (sigma_to.pow(2) - sigma_up.pow(2)).pow(0.5);
  const torch::Tensor derivative = (sample - pred_original_sample) / sigma;
  const torch::Tensor dt = sigma_down - sigma;
  torch::Tensor prev_sample = sample + derivative * dt;
  const torch::Tensor noise =
      randn_tensor(model_output.sizes(), generators, model_output.scalar_type(), model_output.device());
  prev_sample = prev_sample + noise * sigma_up;
  return prev_sample.to(model_output.scalar_type());
}

}  // namespace sdtrain::schedulers
