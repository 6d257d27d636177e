#include "sdtrain/schedulers/pndm_scheduler.h"

#include "sdtrain/schedulers/timestep_spacing.h"
#include "sdtrain/util/error.h"

namespace sdtrain::schedulers {

namespace {

// diffusers PNDMScheduler._timesteps: ascending.
std::vector<int64_t> pndm_base_timesteps(const std::string& spacing, int64_t train_steps, int64_t steps,
                                         int64_t offset) {
  std::vector<int64_t> timesteps;
  if (spacing == "linspace") {
    for (double t : numpy_linspace(0, static_cast<double>(train_steps - 1), steps)) {
      timesteps.push_back(static_cast<int64_t>(round_half_even(t)));
    }
  } else if (spacing == "leading") {
    const int64_t ratio = train_steps / steps;
    for (int64_t i = 0; i < steps; ++i) timesteps.push_back(i * ratio + offset);
  } else {  // trailing
    const double ratio = static_cast<double>(train_steps) / static_cast<double>(steps);
    for (double t : numpy_arange(static_cast<double>(train_steps), 0, -ratio)) {
      timesteps.push_back(static_cast<int64_t>(round_half_even(t)) - 1);
    }
    std::reverse(timesteps.begin(), timesteps.end());
  }
  return timesteps;
}

}  // namespace

PNDMScheduler::PNDMScheduler(const SchedulerConfig& config, bool force_skip_prk_steps)
    : Sampler(config), spacing_(config.timestep_spacing.value_or("leading")) {
  if (!force_skip_prk_steps && !config.skip_prk_steps.value_or(false)) {
    throw ConfigError("scheduler_config.json: PNDMScheduler with \"skip_prk_steps\": false (the Runge-Kutta "
                      "warm-up) is not implemented; use --scheduler pndm (PLMS, what Stable Diffusion folders "
                      "set) or another sampler");
  }
  final_alpha_cumprod_ = config.set_alpha_to_one.value_or(false) ? torch::tensor(1.0f)
                                                                  : schedule_.alphas_cumprod()[0].clone();
}

void PNDMScheduler::set_timesteps(int64_t num_inference_steps, torch::Device device) {
  check_step_count(num_inference_steps);
  const auto base = pndm_base_timesteps(spacing_, config().num_train_timesteps, num_inference_steps,
                                        config().steps_offset);
  // _timesteps[:-1] + _timesteps[-2:-1] + _timesteps[-1:], reversed.
  std::vector<int64_t> plms(base.begin(), base.end() - 1);
  if (base.size() >= 2) plms.push_back(base[base.size() - 2]);
  plms.push_back(base.back());
  std::reverse(plms.begin(), plms.end());
  timestep_values_ = plms;
  timesteps_ = to_long_tensor(plms).to(device);
  ets_.clear();
  cur_sample_ = torch::Tensor();
}

torch::Tensor PNDMScheduler::step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                                  const std::vector<at::Generator>&) {
  expect_step(step_index);
  const int64_t counter = step_index;
  const int64_t ratio = config().num_train_timesteps / num_inference_steps_;
  int64_t timestep = timestep_values_[step_index];
  int64_t prev_timestep = timestep - ratio;
  if (counter != 1) {
    if (ets_.size() > 3) ets_.erase(ets_.begin(), ets_.end() - 3);
    ets_.push_back(model_output);
  } else {
    // The second evaluation at the first timestep: step from t + ratio to t.
    prev_timestep = timestep;
    timestep = timestep + ratio;
  }

  torch::Tensor output = model_output;
  torch::Tensor from = sample;
  const std::size_t n = ets_.size();
  if (n == 1 && counter == 0) {
    cur_sample_ = sample;
  } else if (n == 1 && counter == 1) {
    output = (model_output + ets_[0]) / 2;
    from = cur_sample_;
    cur_sample_ = torch::Tensor();
  } else if (n == 2) {
    output = (3 * ets_[1] - ets_[0]) / 2;
  } else if (n == 3) {
    output = (23 * ets_[2] - 16 * ets_[1] + 5 * ets_[0]) / 12;
  } else {
    output = (1.0 / 24) * (55 * ets_[3] - 59 * ets_[2] + 37 * ets_[1] - 9 * ets_[0]);
  }
  return previous_sample(from, timestep, prev_timestep, output);
}

// x_prev from x_t and the combined noise estimate (PNDM paper, eq. 11).
torch::Tensor PNDMScheduler::previous_sample(const torch::Tensor& sample, int64_t timestep, int64_t prev_timestep,
                                             torch::Tensor model_output) const {
  const torch::Tensor& ac = schedule_.alphas_cumprod();
  TORCH_CHECK(timestep >= 0 && timestep < ac.size(0), "PNDM timestep ", timestep, " outside the training schedule");
  const torch::Tensor alpha_prod_t = ac[timestep];
  const torch::Tensor alpha_prod_t_prev = prev_timestep >= 0 ? ac[prev_timestep] : final_alpha_cumprod_;
  const torch::Tensor beta_prod_t = 1 - alpha_prod_t;
  const torch::Tensor beta_prod_t_prev = 1 - alpha_prod_t_prev;
  if (config().prediction_type == PredictionType::v_prediction) {
    model_output = alpha_prod_t.pow(0.5) * model_output + beta_prod_t.pow(0.5) * sample;
  }
  const torch::Tensor sample_coeff = (alpha_prod_t_prev / alpha_prod_t).pow(0.5);
  const torch::Tensor denominator =
      alpha_prod_t * beta_prod_t_prev.pow(0.5) + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).pow(0.5);
  return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / denominator;
}

}  // namespace sdtrain::schedulers
