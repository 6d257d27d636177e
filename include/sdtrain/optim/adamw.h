#pragma once
// AdamW with fp32 states and torch.optim.AdamW semantics (decoupled weight decay applied to
// the parameter before the Adam update; eps added to sqrt of the bias-corrected v). Plain
// tensor ops, so it runs on CPU and, on the current stream, on CUDA. The trainer's default.

#include "sdtrain/optim/optimizer.h"

namespace sdtrain::optim {

class AdamW : public Optimizer {
 public:
  AdamW(NamedParameters parameters, const OptimizerOptions& options);

  std::string name() const override { return "adamw"; }
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

  std::vector<State> states_;
};

}  // namespace sdtrain::optim
