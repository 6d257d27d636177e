#pragma once
// Mixed precision as diffusers' train_dreambooth.py gets it from accelerate: fp32 master
// weights, the forward under autocast in fp16 or bf16, and for fp16 a dynamic loss scale with
// torch.amp.GradScaler's rules (scale the loss, unscale the gradients before clipping, skip the
// step and halve the scale when a gradient is inf/NaN, double it after 2000 clean steps).

#include <torch/torch.h>

#include <string>

#include "sdtrain/train/precision.h"

namespace sdtrain::train {

// The dtype autocast computes in (fp32 for Precision::fp32).
c10::ScalarType compute_dtype(Precision precision);

// Enables autocast for `device_type` in `precision` for the guard's lifetime, as
// `with torch.autocast(device_type, dtype)` does (nesting counted, cast cache cleared on the
// outermost exit). Does nothing for fp32.
//
// `cache_casts` false: every use casts its fp32 weight anew instead of keeping the half copy in
// autocast's cache until the guard exits (docs/memory.md). Under gradient checkpointing nothing
// else holds those copies, so without the cache the forward never has all of them at once (1.7
// GB for SD 2.1-base's UNet); the values are the same, and a weight used once per forward is
// cast once either way.
class AutocastGuard {
 public:
  AutocastGuard(c10::DeviceType device_type, Precision precision, bool cache_casts = true);
  ~AutocastGuard();
  AutocastGuard(const AutocastGuard&) = delete;
  AutocastGuard& operator=(const AutocastGuard&) = delete;

 private:
  c10::DeviceType device_type_;
  bool active_ = false;
  bool previous_enabled_ = false;
  c10::ScalarType previous_dtype_ = c10::ScalarType::Undefined;
  bool previous_cache_ = true;
};

struct LossScalerOptions {
  double init_scale = 65536.0;  // 2^16
  double growth_factor = 2.0;
  double backoff_factor = 0.5;
  int64_t growth_interval = 2000;
};

// Dynamic loss scaling. Disabled (scale 1, nothing to unscale) for fp32 and bf16, where the
// found-inf check still runs so that a non-finite gradient is reported.
class LossScaler {
 public:
  LossScaler(bool enabled, torch::Device device, const LossScalerOptions& options = {});

  bool enabled() const { return enabled_; }
  // loss * scale (the loss itself when disabled).
  torch::Tensor scale(const torch::Tensor& loss) const;
  // Divides every gradient by the scale in place (ATen's fused
  // _amp_foreach_non_finite_check_and_unscale_) and returns found_inf: float32 [1] on the
  // scaler's device, nonzero when a gradient held inf/NaN. No host read: the trainer's step
  // hands the flag to the optimizer and reads it a forward pass later (device_readback.h).
  // The tensor is the scaler's own, overwritten by the next unscale.
  torch::Tensor unscale(const std::vector<torch::Tensor>& gradients);
  // 1 / scale as float32 [1] on the device, computed as GradScaler does (float64, rounded once).
  torch::Tensor inverse_scale() const;
  // One gradient at a time, with no host synchronisation (fused backward): multiplies `grad` by
  // `inverse_scale` in place and sets `non_finite` (float32 [1], same device) to 1 when it holds
  // inf/NaN. Works whether or not scaling is enabled (the scale is then 1).
  static void unscale_and_flag(const torch::Tensor& grad, const torch::Tensor& non_finite,
                               const torch::Tensor& inverse_scale);
  // After each optimizer step attempt, with the flag on the device (what unscale returned, no
  // host read): backoff on inf/NaN, growth after growth_interval clean steps (ATen's
  // _amp_update_scale_). No-op when disabled.
  void update(const torch::Tensor& found_non_finite);
  // A copy of the scale as float32 [1] on the device: what this step used, for its record.
  torch::Tensor scale_snapshot() const { return scale_.clone(); }

  double scale_value() const;
  int64_t growth_tracker() const;
  // For checkpoints: restores exactly what scale_value()/growth_tracker() returned.
  void set_state(double scale, int64_t growth_tracker);

 private:
  bool enabled_;
  LossScalerOptions options_;
  torch::Tensor scale_;           // float32 [1] on the device
  torch::Tensor growth_tracker_;  // int32 [1] on the device
  torch::Tensor found_inf_;       // float32 [1] on the device
};

}  // namespace sdtrain::train
