#include "sdtrain/schedulers/dpm_solver_multistep_scheduler.h"

#include <cmath>

#include "sdtrain/schedulers/euler_discrete_scheduler.h"
#include "sdtrain/schedulers/timestep_spacing.h"

namespace sdtrain::schedulers {

namespace {

// diffusers DPMSolverMultistepScheduler.set_timesteps without Karras sigmas: N of N + 1 points,
// dropping the last (t = 0) one. lambda_min_clipped is -inf, so the schedule ends at T.
std::vector<int64_t> dpm_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps, int64_t offset) {
  std::vector<int64_t> timesteps;
  if (spacing == "linspace") {
    for (double t : numpy_linspace(0, static_cast<double>(train_steps - 1), steps + 1)) {
      timesteps.push_back(static_cast<int64_t>(round_half_even(t)));
    }
    std::reverse(timesteps.begin(), timesteps.end());
    timesteps.pop_back();
  } else if (spacing == "leading") {
    const int64_t ratio = train_steps / (steps + 1);
    for (int64_t i = steps; i >= 1; --i) timesteps.push_back(i * ratio + offset);
  } else {  // trailing
    const double ratio = static_cast<double>(train_steps) / static_cast<double>(steps);
    for (double t : numpy_arange(static_cast<double>(train_steps), 0, -ratio)) {
      timesteps.push_back(static_cast<int64_t>(round_half_even(t)) - 1);
    }
  }
  return timesteps;
}

// alpha_t = 1 / sqrt(sigma^2 + 1), sigma_t = sigma * alpha_t (variance-preserving form).
std::pair<torch::Tensor, torch::Tensor> alpha_sigma(const torch::Tensor& sigma) {
  const torch::Tensor alpha_t = (sigma.pow(2) + 1).pow(0.5).reciprocal() * 1.0;
  return {alpha_t, sigma * alpha_t};
}

torch::Tensor log_snr(const torch::Tensor& alpha_t, const torch::Tensor& sigma_t) {
  return torch::log(alpha_t) - torch::log(sigma_t);
}

}  // namespace

DPMSolverMultistepScheduler::DPMSolverMultistepScheduler(const SchedulerConfig& config,
                                                         std::optional<bool> use_karras_sigmas)
    : Sampler(config),
      spacing_(config.timestep_spacing.value_or("linspace")),
      karras_(use_karras_sigmas.value_or(config.use_karras_sigmas.value_or(false))) {
  require_default_keys(config, class_name(),
                       {{"algorithm_type", "dpmsolver++"},
                        {"solver_order", 2},
                        {"solver_type", "midpoint"},
                        {"use_exponential_sigmas", false},
                        {"use_beta_sigmas", false},
                        {"use_lu_lambdas", false},
                        {"use_flow_sigmas", false},
                        {"final_sigmas_type", "zero"},
                        {"thresholding", false},
                        {"use_dynamic_shifting", false}});
  auto clipped = config.json.find("lambda_min_clipped");
  if (clipped != config.json.end() && clipped->is_number() && std::isfinite(clipped->get<double>())) {
    require_default_keys(config, class_name(), {{"lambda_min_clipped", "-inf"}});
  }
  auto variance = config.json.find("variance_type");
  if (variance != config.json.end() && !variance->is_null()) {
    require_default_keys(config, class_name(), {{"variance_type", nullptr}});
  }
}

void DPMSolverMultistepScheduler::set_timesteps(int64_t num_inference_steps, torch::Device device) {
  check_step_count(num_inference_steps);
  const torch::Tensor table = sigma_table(schedule_.alphas_cumprod());
  std::vector<int64_t> timesteps;
  std::vector<double> sigmas;
  if (karras_) {
    const float* values = table.data_ptr<float>();
    sigmas = karras_sigmas(values[0], values[table.numel() - 1], num_inference_steps);
    const bool round = config().beta_schedule != "squaredcos_cap_v2";
    for (double sigma : sigmas) {
      const double t = sigma_to_t(sigma, table);
      // numpy rounds (ties to even) except for the cosine schedule, whose float timesteps the
      // int64 cast truncates.
      timesteps.push_back(static_cast<int64_t>(round ? round_half_even(t) : t));
    }
  } else {
    timesteps = dpm_timesteps(spacing_, config().num_train_timesteps, num_inference_steps, config().steps_offset);
    sigmas = interpolate_sigmas(std::vector<double>(timesteps.begin(), timesteps.end()), table);
  }
  sigmas.push_back(0.0);  // final_sigmas_type "zero"
  sigmas_ = to_float_tensor(sigmas);
  timesteps_ = to_long_tensor(timesteps).to(device);
  num_inference_steps_ = static_cast<int64_t>(timesteps.size());
  previous_x0_ = torch::Tensor();
  current_x0_ = torch::Tensor();
  lower_order_nums_ = 0;
}

torch::Tensor DPMSolverMultistepScheduler::predicted_original_sample(const torch::Tensor& model_output,
                                                                     const torch::Tensor& sample,
                                                                     int64_t step_index) const {
  auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[step_index]);
  if (config().prediction_type == PredictionType::epsilon) return (sample - sigma_t * model_output) / alpha_t;
  return alpha_t * sample - sigma_t * model_output;
}

torch::Tensor DPMSolverMultistepScheduler::first_order_update(const torch::Tensor& x0, const torch::Tensor& sample,
                                                              int64_t step_index) const {
  auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[step_index + 1]);
  auto [alpha_s, sigma_s] = alpha_sigma(sigmas_[step_index]);
  const torch::Tensor h = log_snr(alpha_t, sigma_t) - log_snr(alpha_s, sigma_s);
  return (sigma_t / sigma_s) * sample - (alpha_t * (torch::exp(-h) - 1.0)) * x0;
}

torch::Tensor DPMSolverMultistepScheduler::second_order_update(const torch::Tensor& sample, int64_t step_index) const {
  auto [alpha_t, sigma_t] = alpha_sigma(sigmas_[step_index + 1]);
  auto [alpha_s0, sigma_s0] = alpha_sigma(sigmas_[step_index]);
  auto [alpha_s1, sigma_s1] = alpha_sigma(sigmas_[step_index - 1]);
  const torch::Tensor lambda_t = log_snr(alpha_t, sigma_t);
  const torch::Tensor lambda_s0 = log_snr(alpha_s0, sigma_s0);
  const torch::Tensor lambda_s1 = log_snr(alpha_s1, sigma_s1);
  const torch::Tensor& m0 = current_x0_;
  const torch::Tensor& m1 = previous_x0_;
  const torch::Tensor h = lambda_t - lambda_s0;
  const torch::Tensor h_0 = lambda_s0 - lambda_s1;
  const torch::Tensor r0 = h_0 / h;
  const torch::Tensor& d0 = m0;
  const torch::Tensor d1 = (r0.reciprocal() * 1.0) * (m0 - m1);
  // Midpoint form of the second-order data-prediction update.
  return (sigma_t / sigma_s0) * sample - (alpha_t * (torch::exp(-h) - 1.0)) * d0 -
         0.5 * (alpha_t * (torch::exp(-h) - 1.0)) * d1;
}

torch::Tensor DPMSolverMultistepScheduler::step(const torch::Tensor& model_output, int64_t step_index,
                                                const torch::Tensor& sample_in, const std::vector<at::Generator>&) {
  expect_step(step_index);
  // With the final sigma at zero the last step is always first order (diffusers'
  // lower_order_final condition).
  const bool last = step_index == num_steps() - 1;
  previous_x0_ = current_x0_;
  current_x0_ = predicted_original_sample(model_output, sample_in, step_index);
  const torch::Tensor sample = sample_in.to(torch::kFloat32);
  torch::Tensor prev_sample = (lower_order_nums_ < 1 || last) ? first_order_update(current_x0_, sample, step_index)
                                                              : second_order_update(sample, step_index);
  if (lower_order_nums_ < 2) ++lower_order_nums_;
  return prev_sample.to(model_output.scalar_type());
}

}  // namespace sdtrain::schedulers
