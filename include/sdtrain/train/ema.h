#pragma once
// Exponential moving average of a module's parameters, as diffusers' training_utils.EMAModel
// (the `--use_ema` of its training scripts): after every optimizer step,
//   shadow -= (1 - decay) * (shadow - parameter)
// with a decay that grows with the number of EMA steps (get_decay below). The shadow copies
// are float32 and live on a device of their own choosing (CPU keeps them out of GPU memory).

#include <torch/torch.h>

#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "sdtrain/io/safetensors.h"

namespace sdtrain::train {

// EMAModel's constructor arguments, with its defaults.
struct EMAOptions {
  double decay = 0.9999;  // upper bound of the decay
  double min_decay = 0.0;
  int64_t update_after_step = 0;  // EMA steps that only copy the parameters (decay 0)
  bool use_ema_warmup = false;
  double inv_gamma = 1.0;    // warm-up shape, used with use_ema_warmup
  double power = 2.0 / 3.0;  // warm-up shape, used with use_ema_warmup
};

// The decay of EMA step `optimization_step` (1 for the first step): 0 up to and including
// update_after_step + 1; then 1 - (1 + t / inv_gamma)^-power with warm-up, else
// (1 + t) / (10 + t), where t = optimization_step - update_after_step - 1; clamped to
// [min_decay, decay].
double ema_decay_at(const EMAOptions& options, int64_t optimization_step);

class EMAModel {
 public:
  // Shadows every parameter of `module` (named_parameters order, float32 on `device`).
  EMAModel(const torch::nn::Module& module, EMAOptions options = {},
           torch::Device device = torch::kCPU);
  // Shadows the given parameters (a LoRA run: the UNet's adapters), under their names. The
  // calls below then take the same names in the same order.
  EMAModel(const io::NamedTensors& parameters, EMAOptions options = {},
           torch::Device device = torch::kCPU);

  // One EMA step with the module's current parameters; parameters that do not require a
  // gradient are copied, as EMAModel does.
  void step(const torch::nn::Module& module);
  // Writes the shadow values into the module's parameters (e.g. before the final save).
  void copy_to(torch::nn::Module& module) const;
  // Swap the EMA weights in for validation: store() keeps a CPU copy of the module's
  // parameters, copy_to() puts the shadow in, restore() brings the stored values back.
  void store(const torch::nn::Module& module);
  void restore(torch::nn::Module& module);
  void step(const io::NamedTensors& parameters);
  void copy_to(const io::NamedTensors& parameters) const;
  void store(const io::NamedTensors& parameters);
  void restore(const io::NamedTensors& parameters);

  int64_t optimization_step() const { return optimization_step_; }
  double current_decay() const { return current_decay_; }  // decay of the last step()
  const EMAOptions& options() const { return options_; }
  const io::NamedTensors& shadow() const { return shadow_; }

  // The shadow under the parameter names, with the step count and options in the metadata
  // ("ema_optimization_step", ...). load() takes the step count and the tensors (every name,
  // shape present; ModelError naming the file and tensor otherwise) and keeps this object's
  // options, which come from the configuration.
  void save(const std::filesystem::path& path) const;
  void load(const std::filesystem::path& path);

 private:
  EMAOptions options_;
  torch::Device device_;
  io::NamedTensors shadow_;
  std::vector<torch::Tensor> stored_;
  int64_t optimization_step_ = 0;
  double current_decay_ = 0.0;
};

}  // namespace sdtrain::train
