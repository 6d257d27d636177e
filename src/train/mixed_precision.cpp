#include "sdtrain/train/mixed_precision.h"

#include <ATen/autocast_mode.h>

#include "sdtrain/train/tensor_groups.h"
#include "sdtrain/util/error.h"

namespace sdtrain::train {

Precision parse_precision(const std::string& name) {
  if (name == "no" || name == "fp32") return Precision::fp32;
  if (name == "fp16") return Precision::fp16;
  if (name == "bf16") return Precision::bf16;
  throw ConfigError("mixed_precision: \"" + name + "\" is not one of no, fp16, bf16");
}

const char* to_string(Precision precision) {
  switch (precision) {
    case Precision::fp16:
      return "fp16";
    case Precision::bf16:
      return "bf16";
    default:
      return "no";
  }
}

c10::ScalarType compute_dtype(Precision precision) {
  switch (precision) {
    case Precision::fp16:
      return torch::kHalf;
    case Precision::bf16:
      return torch::kBFloat16;
    default:
      return torch::kFloat;
  }
}

AutocastGuard::AutocastGuard(c10::DeviceType device_type, Precision precision, bool cache_casts)
    : device_type_(device_type) {
  if (precision == Precision::fp32) return;
  active_ = true;
  previous_enabled_ = at::autocast::is_autocast_enabled(device_type_);
  previous_dtype_ = at::autocast::get_autocast_dtype(device_type_);
  previous_cache_ = at::autocast::is_autocast_cache_enabled();
  at::autocast::set_autocast_cache_enabled(cache_casts);
  at::autocast::set_autocast_enabled(device_type_, true);
  at::autocast::set_autocast_dtype(device_type_, compute_dtype(precision));
  at::autocast::increment_nesting();
}

AutocastGuard::~AutocastGuard() {
  if (!active_) return;
  if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
  at::autocast::set_autocast_enabled(device_type_, previous_enabled_);
  at::autocast::set_autocast_dtype(device_type_, previous_dtype_);
  at::autocast::set_autocast_cache_enabled(previous_cache_);
}

LossScaler::LossScaler(bool enabled, torch::Device device, const LossScalerOptions& options)
    : enabled_(enabled), options_(options) {
  const auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(device);
  scale_ = torch::full({1}, enabled ? options.init_scale : 1.0, f32);
  growth_tracker_ = torch::zeros({1}, f32.dtype(torch::kInt));
  found_inf_ = torch::zeros({1}, f32);
}

torch::Tensor LossScaler::scale(const torch::Tensor& loss) const {
  if (!enabled_) return loss;
  return loss * scale_.to(loss.scalar_type());
}

torch::Tensor LossScaler::inverse_scale() const {
  // GradScaler computes the inverse in float64 and rounds it to float32 once.
  return scale_.to(torch::kDouble).reciprocal().to(torch::kFloat);
}

void LossScaler::unscale_and_flag(const torch::Tensor& grad, const torch::Tensor& non_finite,
                                  const torch::Tensor& inverse_scale) {
  torch::Tensor flag = non_finite;
  at::_amp_foreach_non_finite_check_and_unscale_({grad}, flag, inverse_scale);
}

torch::Tensor LossScaler::unscale(const std::vector<torch::Tensor>& gradients) {
  found_inf_.zero_();
  const torch::Tensor inv_scale = inverse_scale();
  // The fused kernel wants one device and dtype per list, as GradScaler groups them.
  for (auto& grads : group_by_device_and_dtype(gradients)) {
    const torch::Device device = grads.front().device();
    torch::Tensor found = torch::zeros({1}, found_inf_.options().device(device));
    at::_amp_foreach_non_finite_check_and_unscale_(grads, found, inv_scale.to(device));
    found_inf_.add_(found.to(found_inf_.device()));
  }
  return found_inf_;
}

void LossScaler::update(const torch::Tensor& found_non_finite) {
  if (!enabled_) return;
  at::_amp_update_scale_(scale_, growth_tracker_, found_non_finite, options_.growth_factor,
                         options_.backoff_factor, options_.growth_interval);
}

double LossScaler::scale_value() const { return scale_.item<double>(); }

int64_t LossScaler::growth_tracker() const { return growth_tracker_.item<int64_t>(); }

void LossScaler::set_state(double scale, int64_t growth_tracker) {
  scale_.fill_(scale);
  growth_tracker_.fill_(growth_tracker);
}

}  // namespace sdtrain::train
