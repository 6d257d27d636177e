#include "sdtrain/schedulers/noise_schedule.h"

#include <cmath>

#include "sdtrain/util/error.h"

namespace sdtrain::schedulers {

namespace {

// Nichol & Dhariwal's cosine schedule as diffusers' betas_for_alpha_bar builds it: the
// products in float64, each beta capped at 0.999, then cast to float32.
torch::Tensor squaredcos_cap_v2_betas(int64_t count) {
  auto alpha_bar = [](double t) {
    const double c = std::cos((t + 0.008) / 1.008 * M_PI / 2);
    return c * c;
  };
  std::vector<double> betas;
  for (int64_t i = 0; i < count; ++i) {
    const double t1 = static_cast<double>(i) / count;
    const double t2 = static_cast<double>(i + 1) / count;
    betas.push_back(std::min(1 - alpha_bar(t2) / alpha_bar(t1), 0.999));
  }
  return torch::tensor(betas, torch::kFloat64).to(torch::kFloat32);
}

}  // namespace

torch::Tensor make_betas(const SchedulerConfig& config) {
  const int64_t count = config.num_train_timesteps;
  if (!config.trained_betas.empty())
    return torch::tensor(config.trained_betas, torch::kFloat64).to(torch::kFloat32);
  if (config.beta_schedule == "linear") {
    return torch::linspace(config.beta_start, config.beta_end, count, torch::kFloat32);
  }
  if (config.beta_schedule == "scaled_linear") {
    // Stable Diffusion's schedule: linear in sqrt(beta).
    return torch::linspace(std::sqrt(config.beta_start), std::sqrt(config.beta_end), count,
                           torch::kFloat32)
        .pow(2);
  }
  if (config.beta_schedule == "squaredcos_cap_v2") return squaredcos_cap_v2_betas(count);
  throw ModelError("scheduler_config.json: \"beta_schedule\" = \"" + config.beta_schedule +
                   "\" is not supported");
}

NoiseSchedule::NoiseSchedule(const SchedulerConfig& config)
    : config_(config),
      betas_(make_betas(config)),
      alphas_cumprod_(torch::cumprod(1.0 - betas_, 0)) {
  // The whole table at once: square roots, the division and the square are correctly rounded,
  // so each entry equals what compute_snr gives for that timestep alone.
  snr_ = (alphas_cumprod_.pow(0.5) / (1.0 - alphas_cumprod_).pow(0.5)).pow(2);
}

NoiseSchedule NoiseSchedule::on(torch::Device device) const {
  NoiseSchedule copy = *this;
  copy.alphas_cumprod_ = alphas_cumprod_.to(device);
  copy.snr_ = snr_.to(device);
  return copy;
}

std::pair<torch::Tensor, torch::Tensor> NoiseSchedule::coefficients(
    const torch::Tensor& timesteps, const torch::Tensor& like) const {
  TORCH_CHECK(timesteps.dim() == 1 && timesteps.size(0) == like.size(0),
              "timesteps must be [batch] matching the samples' batch");
  // diffusers casts alphas_cumprod to the samples' dtype before the square roots.
  const torch::Tensor table = alphas_cumprod_.to(like.device(), like.scalar_type());
  const torch::Tensor selected = table.index_select(0, timesteps.to(like.device(), torch::kLong));
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = like.size(0);
  return {selected.pow(0.5).view(shape), (1 - selected).pow(0.5).view(shape)};
}

torch::Tensor NoiseSchedule::add_noise(const torch::Tensor& x0, const torch::Tensor& noise,
                                       const torch::Tensor& timesteps) const {
  auto [sqrt_alpha, sqrt_one_minus_alpha] = coefficients(timesteps, x0);
  return sqrt_alpha * x0 + sqrt_one_minus_alpha * noise;
}

torch::Tensor NoiseSchedule::velocity(const torch::Tensor& x0, const torch::Tensor& noise,
                                      const torch::Tensor& timesteps) const {
  auto [sqrt_alpha, sqrt_one_minus_alpha] = coefficients(timesteps, x0);
  return sqrt_alpha * noise - sqrt_one_minus_alpha * x0;
}

torch::Tensor NoiseSchedule::training_target(const torch::Tensor& x0, const torch::Tensor& noise,
                                             const torch::Tensor& timesteps) const {
  if (config_.prediction_type == PredictionType::v_prediction)
    return velocity(x0, noise, timesteps);
  return noise;
}

torch::Tensor NoiseSchedule::snr(const torch::Tensor& timesteps) const {
  const torch::Tensor t = timesteps.to(snr_.device(), torch::kLong);
  return snr_.index_select(0, t).to(timesteps.device());
}

}  // namespace sdtrain::schedulers
