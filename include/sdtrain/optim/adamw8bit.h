#pragma once
// AdamW with blockwise 8-bit states (bitsandbytes' AdamW8bit algorithm; what it computes and
// why: docs/optimizer.md). m and v are stored as uint8 codes
// into the signed / unsigned dynamic maps, in blocks of 256 elements with one fp32 absmax per
// block and state. Tensors with fewer than min_8bit_size elements keep fp32 states.
//
// CPU parameters take the reference path (this file's .cpp, the definition of correct); CUDA
// parameters take the multi-tensor kernels (adamw8bit.cu), which produce the same bits.

#include <array>
#include <optional>

#include "sdtrain/optim/adam_element_math.h"
#include "sdtrain/optim/captured_arguments.h"
#include "sdtrain/optim/optimizer.h"

namespace sdtrain::optim {

class AdamW8bit : public Optimizer {
 public:
  AdamW8bit(NamedParameters parameters, const OptimizerOptions& options);

  std::string name() const override { return "adamw8bit"; }
  // CUDA parameters with gradients are updated together in a few multi-tensor launches on the
  // current stream, with no host synchronisation; CPU parameters one by one.
  void step() override;
  // CUDA parameters: the flag goes to the kernels (one launch for all, no host read); CPU
  // parameters read it on the host, as the base does.
  std::vector<size_t> step_unless(const torch::Tensor& skip) override;
  using Optimizer::step_parameter;
  void step_parameter(size_t index, const torch::Tensor& grad,
                      const torch::Tensor& skip) override;
  void retract_step(size_t index) override { states_.at(index).step -= 1; }
  int64_t step_count(size_t index) const override { return states_.at(index).step; }
  int64_t state_bytes() const override;

  // CUDA parameters only (one device): the argument tables of the captured launches live in
  // one device buffer that prepare_replay rewrites (captured_arguments.h).
  bool graph_capturable() const override { return true; }
  void begin_graph_capture() override;
  void end_graph_capture() override { capturing_ = false; }
  void prepare_replay(bool dry) override;

  void save_state(io::NamedTensors& tensors, std::map<std::string, std::string>& metadata,
                  const std::string& prefix = "optimizer.") const override;
  // Refuses (ModelError) a checkpoint with another block size, other tables, another
  // min_8bit_size or a state tensor of the wrong dtype or size.
  void load_state(const io::SafetensorsFile& file,
                  const std::string& prefix = "optimizer.") override;

  struct ParameterState {
    int64_t step = 0;
    bool quantized = false;
    // quantized: uint8 [n] codes of m (signed map) and v (unsigned map), fp32 [ceil(n/256)]
    // absmax1/absmax2. Otherwise fp32 [n] m and v, absmax undefined. n = parameter numel.
    torch::Tensor state1, state2, absmax1, absmax2;
  };
  const ParameterState& state(size_t index) const { return states_.at(index); }
  // Decoded m and v of parameter `index`: CPU fp32 [n].
  torch::Tensor exp_avg(size_t index) const;
  torch::Tensor exp_avg_sq(size_t index) const;

  // fp32 constants of one step with per-parameter step count `step` (>= 1); `index` picks the
  // parameter's stochastic-rounding stream (used only with options.stochastic_rounding).
  static AdamStepConstants step_constants(const OptimizerOptions& options, int64_t step,
                                          size_t index = 0);

 private:
  // The parameters with a gradient, by device: the CUDA ones (checked, with their gradients)
  // for one launch, and the CPU ones.
  struct GradientsByDevice {
    std::vector<size_t> cuda;
    std::vector<torch::Tensor> cuda_grads;
    std::vector<size_t> cpu;
  };
  GradientsByDevice gradients_by_device() const;
  void step_cpu(size_t index, const torch::Tensor& grad);
  void step_cuda(const std::vector<size_t>& indices, const std::vector<torch::Tensor>& grads,
                 const torch::Tensor& skip = torch::Tensor());
  const std::array<torch::Tensor, 2>& device_qmaps(const torch::Device& device);

  std::vector<ParameterState> states_;
  // Between begin_graph_capture and end_graph_capture: steps are recorded, not counted.
  bool capturing_ = false;
  std::optional<CapturedArguments> captured_;
  torch::Tensor dry_skip_;  // float32 [1] = 1 on the device: a dry replay's skip flag
  // Tables copied to each CUDA device in use, [0] signed, [1] unsigned (fp32 [256] each).
  std::map<int, std::array<torch::Tensor, 2>> device_qmaps_;
};

// CPU reference updates over raw, contiguous memory (the definition of correct; the CUDA
// kernels reproduce them bit for bit). T is float, c10::Half or c10::BFloat16.
//   quantized: state1/state2 are n uint8 codes, absmax1/absmax2 ceil(n/256) floats.
template <typename T>
void adamw8bit_reference_update(T* param, const T* grad, std::uint8_t* state1,
                                std::uint8_t* state2, float* absmax1, float* absmax2,
                                int64_t n, const AdamStepConstants& constants,
                                const float* qmap_signed, const float* qmap_unsigned);
//   fp32 states (tensors under min_8bit_size): exp_avg/exp_avg_sq are n floats.
template <typename T>
void adamw_fp32_state_reference_update(T* param, const T* grad, float* exp_avg,
                                       float* exp_avg_sq, int64_t n,
                                       const AdamStepConstants& constants);

}  // namespace sdtrain::optim
