#include "sdtrain/schedulers/timestep_spacing.h"

#include <algorithm>
#include <cfenv>
#include <cmath>

namespace sdtrain::schedulers {

std::vector<double> numpy_linspace(double start, double stop, int64_t num) {
  std::vector<double> values;
  if (num <= 0) return values;
  if (num == 1) return {start};
  const double step = (stop - start) / static_cast<double>(num - 1);
  for (int64_t k = 0; k < num; ++k) values.push_back(static_cast<double>(k) * step + start);
  values.back() = stop;
  return values;
}

std::vector<double> numpy_arange(double start, double stop, double step) {
  const auto length = static_cast<int64_t>(std::ceil((stop - start) / step));
  std::vector<double> values;
  if (length <= 0) return values;
  values.push_back(start);
  if (length == 1) return values;
  values.push_back(start + step);
  const double delta = values[1] - start;
  for (int64_t i = 2; i < length; ++i) values.push_back(start + static_cast<double>(i) * delta);
  return values;
}

double round_half_even(double value) {
  // nearbyint honours the rounding mode, which is round-to-nearest-even unless changed.
  return std::nearbyint(value);
}

torch::Tensor sigma_table(const torch::Tensor& alphas_cumprod) {
  return ((1 - alphas_cumprod) / alphas_cumprod).pow(0.5);
}

std::vector<double> interpolate_sigmas(const std::vector<double>& timesteps, const torch::Tensor& table) {
  const torch::Tensor contiguous = table.to(torch::kCPU, torch::kFloat).contiguous();
  const float* fp = contiguous.data_ptr<float>();
  const int64_t size = contiguous.numel();
  std::vector<double> sigmas;
  for (double x : timesteps) {
    if (x <= 0) {
      sigmas.push_back(fp[0]);
    } else if (x >= static_cast<double>(size - 1)) {
      sigmas.push_back(fp[size - 1]);
    } else {
      const auto j = static_cast<int64_t>(std::floor(x));
      // numpy: slope * (x - xp[j]) + fp[j], with the slope in float64.
      const double slope = static_cast<double>(fp[j + 1]) - static_cast<double>(fp[j]);
      sigmas.push_back(slope * (x - static_cast<double>(j)) + fp[j]);
    }
  }
  return sigmas;
}

std::vector<double> karras_sigmas(double sigma_min, double sigma_max, int64_t num) {
  constexpr double rho = 7.0;
  const double min_inv_rho = std::pow(sigma_min, 1 / rho);
  const double max_inv_rho = std::pow(sigma_max, 1 / rho);
  std::vector<double> sigmas;
  for (double ramp : numpy_linspace(0, 1, num)) sigmas.push_back(std::pow(max_inv_rho + ramp * (min_inv_rho - max_inv_rho), rho));
  return sigmas;
}

double sigma_to_t(double sigma, const torch::Tensor& table) {
  const torch::Tensor contiguous = table.to(torch::kCPU, torch::kFloat).contiguous();
  const float* sigmas = contiguous.data_ptr<float>();
  const int64_t size = contiguous.numel();
  // np.log of the float32 table stays float32; the query's log is float64.
  std::vector<float> log_sigmas(size);
  for (int64_t i = 0; i < size; ++i) log_sigmas[i] = static_cast<float>(std::log(static_cast<double>(sigmas[i])));
  const double log_sigma = std::log(std::max(sigma, 1e-10));
  // low_idx: the last index whose log-sigma is <= log_sigma (argmax of the cumulative count),
  // clipped so that low_idx + 1 is valid.
  int64_t count = 0, best = 0, low = 0;
  for (int64_t i = 0; i < size; ++i) {
    count += (log_sigma - static_cast<double>(log_sigmas[i]) >= 0) ? 1 : 0;
    if (count > best) best = count, low = i;
  }
  low = std::min(low, size - 2);
  const float low_value = log_sigmas[low];
  const float high_value = log_sigmas[low + 1];
  const float span = low_value - high_value;  // float32 - float32 stays float32 in numpy
  double w = (static_cast<double>(low_value) - log_sigma) / static_cast<double>(span);
  w = std::clamp(w, 0.0, 1.0);
  return (1 - w) * static_cast<double>(low) + w * static_cast<double>(low + 1);
}

torch::Tensor to_float_tensor(const std::vector<double>& values) {
  return torch::tensor(values, torch::kFloat64).to(torch::kFloat32);
}

torch::Tensor to_long_tensor(const std::vector<int64_t>& values) { return torch::tensor(values, torch::kLong); }

}  // namespace sdtrain::schedulers
