#pragma once
// AdamW with fp32 states and torch.optim.AdamW semantics (decoupled weight decay applied to
// the parameter before the Adam update; eps added to sqrt of the bias-corrected v).
//
// Two ways to step all parameters (step, step_unless):
//   - torch.optim.AdamW's single-tensor ops, per parameter: on the CPU, bit for bit
//     what diffusers' scripts compute there (the parity tests), and for fp16/bf16 parameters;
//   - torch's fused multi-tensor kernel (_fused_adamw_, torch.optim.AdamW(fused=True)): where
//     every parameter is float32 on a GPU (OptimizerOptions::fused_kernel). A few launches for
//     all parameters instead of eight per parameter (a LoRA run's hundreds of adapter
//     tensors), and the fp16 skip flag read by the kernel on the device, so step_unless does
//     not wait for the GPU. It rounds the parameter's update in another order: the moments
//     are the same, the parameters differ by about an ulp per step (tests/optim/adamw_test.cpp).
// Steps inside the backward pass (step_parameter) always take the single-tensor ops.

#include "sdtrain/optim/optimizer.h"

namespace sdtrain::optim {

class AdamW : public Optimizer {
 public:
  AdamW(NamedParameters parameters, const OptimizerOptions& options);

  std::string name() const override { return "adamw"; }
  void step() override;
  // With the fused kernel: the flag stays on the device, and every stepped parameter's count
  // advances (returned, for retract_step once the flag is read). Otherwise reads it first.
  std::vector<size_t> step_unless(const torch::Tensor& skip) override;
  bool uses_fused_kernel() const { return fused_kernel_; }
  using Optimizer::step_parameter;
  void step_parameter(size_t index, const torch::Tensor& grad,
                      const torch::Tensor& skip) override;
  void retract_step(size_t index) override { states_.at(index).step -= 1; }
  int64_t step_count(size_t index) const override { return states_.at(index).step; }
  int64_t state_bytes() const override;

  void save_state(io::NamedTensors& tensors, std::map<std::string, std::string>& metadata,
                  const std::string& prefix = "optimizer.") const override;
  void load_state(const io::SafetensorsFile& file,
                  const std::string& prefix = "optimizer.") override;

  // fp32 moments of parameter `index`, shaped like the parameter (for tests and inspection).
  const torch::Tensor& exp_avg(size_t index) const { return states_.at(index).exp_avg; }
  const torch::Tensor& exp_avg_sq(size_t index) const { return states_.at(index).exp_avg_sq; }

 private:
  struct State {
    int64_t step = 0;
    torch::Tensor exp_avg;     // fp32, parameter's shape and device
    torch::Tensor exp_avg_sq;  // fp32, parameter's shape and device
  };
  // torch.optim.AdamW's single-tensor update of `param` with `grad`; state.step already counts it.
  void update(torch::Tensor& param, const torch::Tensor& grad, State& state) const;
  // One _fused_adamw_ call over every parameter with a gradient, skipped on the device where
  // `skip` (undefined: never) is 1; returns the parameters whose counts it advanced.
  std::vector<size_t> fused_step(const torch::Tensor& skip);

  std::vector<State> states_;
  bool fused_kernel_ = false;
};

}  // namespace sdtrain::optim
