#include "sdtrain/schedulers/euler_discrete_scheduler.h"

#include "sdtrain/schedulers/timestep_spacing.h"
#include "sdtrain/util/error.h"

namespace sdtrain::schedulers {

std::vector<float> euler_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps, int64_t offset) {
  std::vector<float> timesteps;
  if (spacing == "linspace") {
    // np.linspace(..., dtype=float32): computed in float64, then cast.
    for (double t : numpy_linspace(0, static_cast<double>(train_steps - 1), steps)) {
      timesteps.push_back(static_cast<float>(t));
    }
    std::reverse(timesteps.begin(), timesteps.end());
  } else if (spacing == "leading") {
    const int64_t ratio = train_steps / steps;
    for (int64_t i = steps - 1; i >= 0; --i) timesteps.push_back(static_cast<float>(i * ratio) + static_cast<float>(offset));
  } else {  // trailing
    const double ratio = static_cast<double>(train_steps) / static_cast<double>(steps);
    for (double t : numpy_arange(static_cast<double>(train_steps), 0, -ratio)) {
      timesteps.push_back(static_cast<float>(round_half_even(t)) - 1.0f);
    }
  }
  return timesteps;
}

void require_default_keys(const SchedulerConfig& config, const std::string& class_name,
                          const std::vector<std::pair<std::string, nlohmann::json>>& keys) {
  for (const auto& [key, expected] : keys) {
    auto it = config.json.find(key);
    if (it == config.json.end() || it->is_null() || *it == expected) continue;
    throw ModelError("scheduler_config.json: \"" + key + "\" = " + it->dump() + " is not supported by " + class_name +
                     " here (expected " + expected.dump() + "); choose another sampler with --scheduler");
  }
}

EulerDiscreteScheduler::EulerDiscreteScheduler(const SchedulerConfig& config)
    : Sampler(config),
      spacing_(config.timestep_spacing.value_or("linspace")),
      karras_(config.use_karras_sigmas.value_or(false)) {
  require_default_keys(config, class_name(),
                       {{"interpolation_type", "linear"},
                        {"use_exponential_sigmas", false},
                        {"use_beta_sigmas", false},
                        {"timestep_type", "discrete"},
                        {"final_sigmas_type", "zero"}});
  for (const char* key : {"sigma_min", "sigma_max"}) {
    auto it = config.json.find(key);
    if (it != config.json.end() && !it->is_null()) {
      throw ModelError(std::string("scheduler_config.json: \"") + key + "\" is not supported by " + class_name());
    }
  }
}

void EulerDiscreteScheduler::set_timesteps(int64_t num_inference_steps, torch::Device device) {
  check_step_count(num_inference_steps);
  const auto placed = euler_timesteps(spacing_, config().num_train_timesteps, num_inference_steps,
                                      config().steps_offset);
  std::vector<double> timesteps(placed.begin(), placed.end());
  const torch::Tensor table = sigma_table(schedule_.alphas_cumprod());
  std::vector<double> sigmas = interpolate_sigmas(timesteps, table);
  if (karras_) {
    // Karras spacing between the interpolated end points; timesteps follow the sigmas.
    sigmas = karras_sigmas(sigmas.back(), sigmas.front(), num_inference_steps);
    timesteps.clear();
    for (double sigma : sigmas) timesteps.push_back(static_cast<float>(sigma_to_t(sigma, table)));
  }
  sigmas.push_back(0.0);  // final_sigmas_type "zero"
  sigmas_ = to_float_tensor(sigmas);
  timesteps_ = to_float_tensor(timesteps).to(device);
}

double EulerDiscreteScheduler::init_noise_sigma() const {
  const torch::Tensor max_sigma = sigmas_.max();
  if (spacing_ == "linspace" || spacing_ == "trailing") return max_sigma.item<float>();
  return (max_sigma.pow(2) + 1).pow(0.5).item<float>();
}

torch::Tensor EulerDiscreteScheduler::scale_model_input(const torch::Tensor& sample, int64_t step_index) {
  const torch::Tensor sigma = sigmas_[step_index];
  return sample / (sigma.pow(2) + 1).pow(0.5);
}

torch::Tensor EulerDiscreteScheduler::step(const torch::Tensor& model_output, int64_t step_index,
                                           const torch::Tensor& sample_in, const std::vector<at::Generator>&) {
  expect_step(step_index);
  // diffusers steps in float32 whatever the model's dtype.
  const torch::Tensor sample = sample_in.to(torch::kFloat32);
  const torch::Tensor sigma = sigmas_[step_index];
  const torch::Tensor sigma_hat = sigma * (0.0 + 1);  // s_churn = 0: gamma = 0
  torch::Tensor pred_original_sample;
  if (config().prediction_type == PredictionType::epsilon) {
    pred_original_sample = sample - sigma_hat * model_output;
  } else {
    pred_original_sample = model_output * (-sigma / (sigma.pow(2) + 1).pow(0.5)) + (sample / (sigma.pow(2) + 1));
  }
  const torch::Tensor derivative = (sample - pred_original_sample) / sigma_hat;
  const torch::Tensor dt = sigmas_[step_index + 1] - sigma_hat;
  return (sample + derivative * dt).to(model_output.scalar_type());
}

}  // namespace sdtrain::schedulers
