#include "sdtrain/schedulers/ddim_scheduler.h"

#include "sdtrain/schedulers/timestep_spacing.h"

namespace sdtrain::schedulers {

namespace {

// diffusers DDIMScheduler.set_timesteps: descending integer timesteps.
std::vector<int64_t> ddim_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps, int64_t offset) {
  std::vector<int64_t> timesteps;
  if (spacing == "linspace") {
    for (double t : numpy_linspace(0, static_cast<double>(train_steps - 1), steps)) {
      timesteps.push_back(static_cast<int64_t>(round_half_even(t)));
    }
    std::reverse(timesteps.begin(), timesteps.end());
  } else if (spacing == "leading") {
    const int64_t ratio = train_steps / steps;
    for (int64_t i = steps - 1; i >= 0; --i) timesteps.push_back(i * ratio + offset);
  } else {  // trailing
    const double ratio = static_cast<double>(train_steps) / static_cast<double>(steps);
    for (double t : numpy_arange(static_cast<double>(train_steps), 0, -ratio)) {
      timesteps.push_back(static_cast<int64_t>(round_half_even(t)) - 1);
    }
  }
  return timesteps;
}

}  // namespace

DDIMScheduler::DDIMScheduler(const SchedulerConfig& config)
    : Sampler(config),
      spacing_(config.timestep_spacing.value_or("leading")),
      clip_sample_(config.clip_sample.value_or(true)) {
  final_alpha_cumprod_ = config.set_alpha_to_one.value_or(true) ? torch::tensor(1.0f)
                                                                 : schedule_.alphas_cumprod()[0].clone();
}

void DDIMScheduler::set_timesteps(int64_t num_inference_steps, torch::Device device) {
  check_step_count(num_inference_steps);
  timestep_values_ = ddim_timesteps(spacing_, config().num_train_timesteps, num_inference_steps, config().steps_offset);
  timesteps_ = to_long_tensor(timestep_values_).to(device);
}

torch::Tensor DDIMScheduler::step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                                  const std::vector<at::Generator>&) {
  expect_step(step_index);
  const torch::Tensor& ac = schedule_.alphas_cumprod();
  const int64_t t = timestep_values_[step_index];
  // diffusers steps back by T // N whatever the spacing.
  const int64_t prev_t = t - config().num_train_timesteps / num_inference_steps_;
  TORCH_CHECK(t >= 0 && t < ac.size(0), "DDIM timestep ", t, " outside the training schedule");
  const torch::Tensor alpha_prod_t = ac[t];
  const torch::Tensor alpha_prod_t_prev = prev_t >= 0 ? ac[prev_t] : final_alpha_cumprod_;
  const torch::Tensor beta_prod_t = 1 - alpha_prod_t;

  torch::Tensor pred_original_sample, pred_epsilon;
  if (config().prediction_type == PredictionType::epsilon) {
    pred_original_sample = (sample - beta_prod_t.pow(0.5) * model_output) / alpha_prod_t.pow(0.5);
    pred_epsilon = model_output;
  } else {
    pred_original_sample = alpha_prod_t.pow(0.5) * sample - beta_prod_t.pow(0.5) * model_output;
    pred_epsilon = alpha_prod_t.pow(0.5) * model_output + beta_prod_t.pow(0.5) * sample;
  }
  if (clip_sample_) {
    pred_original_sample = pred_original_sample.clamp(-config().clip_sample_range, config().clip_sample_range);
  }
  // eta = 0: the noise term's standard deviation is zero.
  const torch::Tensor pred_sample_direction = (1 - alpha_prod_t_prev).pow(0.5) * pred_epsilon;
  return alpha_prod_t_prev.pow(0.5) * pred_original_sample + pred_sample_direction;
}

}  // namespace sdtrain::schedulers
