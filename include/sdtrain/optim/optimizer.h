#pragma once
// The optimizer interface the trainer uses: one set of hyperparameters for all parameters, a
// learning rate that LR schedules set before each step, whole-model and per-parameter steps
// (the latter so a later issue can step a parameter as soon as its gradient is ready), and
// optimizer state that goes into checkpoints as named tensors plus string metadata.

#include <torch/torch.h>

#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "sdtrain/io/safetensors.h"

namespace sdtrain::optim {

struct OptimizerOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 1e-2;
  // adamw8bit only: tensors with fewer elements keep fp32 states (bitsandbytes' default).
  int64_t min_8bit_size = 4096;
  // adamw8bit only: bf16 parameters are rounded stochastically after each update (lean mode,
  // docs/memory.md), with random bits drawn from (rounding_seed, parameter, step, element), so a
  // given seed gives the same bits on the CPU and on CUDA.
  bool stochastic_rounding = false;
  uint64_t rounding_seed = 0;
  // adamw only: step all parameters with torch's multi-tensor fused AdamW kernel
  // (_fused_adamw_), which reads the skip flag on the device. Unset: on when every parameter
  // is float32 on a GPU (include/sdtrain/optim/adamw.h); tests set it to run it on the CPU.
  std::optional<bool> fused_kernel;
};

// (name, tensor) pairs; names key the state in checkpoints and name tensors in error messages.
using NamedParameters = std::vector<std::pair<std::string, torch::Tensor>>;

// The gradient with the parameter's strides. Parameters may be in any dense layout (a
// channels-last convolution weight: compute.channels_last); kernels that walk a parameter's
// storage (adamw8bit's) must read its gradient element for element in the same order, and
// their flat states follow that order. Autograd already gives a dense parameter a gradient of
// its own layout; a gradient of another layout is copied into one.
torch::Tensor gradient_in_parameter_layout(const torch::Tensor& grad, const torch::Tensor& param);

class Optimizer {
 public:
  Optimizer(NamedParameters parameters, const OptimizerOptions& options);
  virtual ~Optimizer() = default;
  Optimizer(const Optimizer&) = delete;
  Optimizer& operator=(const Optimizer&) = delete;

  virtual std::string name() const = 0;

  // Steps every parameter whose .grad() is defined. Parameters without a gradient keep their
  // state and step count, as in torch.optim.
  virtual void step();
  // step(), unless `skip` (a one-element float32 tensor) is nonzero: then no parameter or state
  // changes (an fp16 overflow). Returns the parameters whose step count advanced without the
  // flag having been read (the caller reads it later and calls retract_step for each of them if
  // it was set). This base version reads `skip` on the host first and returns none; adamw8bit
  // hands it to its CUDA kernels, which read it on the device (no host synchronisation).
  virtual std::vector<size_t> step_unless(const torch::Tensor& skip);
  // Steps parameter `index` with `grad` (same shape, dtype and device as the parameter), so a
  // backward hook can step and free each gradient as soon as it is ready.
  void step_parameter(size_t index, const torch::Tensor& grad) {
    step_parameter(index, grad, torch::Tensor());
  }
  // The same, unless `skip` (a one-element float32 tensor on the parameter's device) is
  // nonzero when the update runs: then the parameter and its state stay as they are. The step
  // count advances either way, so the caller need not read `skip` on the host; once it has, it
  // calls retract_step for each skipped parameter (fused backward under fp16 loss scaling).
  virtual void step_parameter(size_t index, const torch::Tensor& grad,
                              const torch::Tensor& skip) = 0;
  // Undoes the step-count advance of a skipped step_parameter call.
  virtual void retract_step(size_t index) = 0;
  // Steps parameter `index` with its .grad(); does nothing when that is undefined.
  void step_parameter(size_t index);

  void zero_grad(bool set_to_none = true);

  // CUDA-graph capture of the steps a backward pass makes (fused_backward_pass under
  // cuda_graphs, include/sdtrain/train/micro_batch_pass.h). Between begin_graph_capture and
  // end_graph_capture, step_parameter queues kernels that read their per-step arguments
  // (learning rate, bias corrections, rounding seed, skip flag) from one device buffer and
  // counts nothing; before each replay, prepare_replay writes that buffer for the next step and
  // counts it (or, `dry`, writes arguments that make every captured update skip, counting
  // nothing). Only adamw8bit on CUDA can; the others refuse (std::logic_error).
  virtual bool graph_capturable() const { return false; }
  virtual void begin_graph_capture();
  virtual void end_graph_capture() {}
  virtual void prepare_replay(bool /*dry*/) {}

  void set_lr(double lr) { options_.lr = lr; }
  double lr() const { return options_.lr; }
  const OptimizerOptions& options() const { return options_; }

  size_t num_parameters() const { return parameters_.size(); }
  const NamedParameters& parameters() const { return parameters_; }
  // Steps taken by parameter `index` (bias correction uses this count, as torch does).
  virtual int64_t step_count(size_t index) const = 0;

  // Bytes held by optimizer state tensors (moments, absmax, tables), on every device.
  virtual int64_t state_bytes() const = 0;

  // Appends the state as tensors named `prefix` + ... and metadata entries `prefix` + ....
  virtual void save_state(io::NamedTensors& tensors, std::map<std::string, std::string>& metadata,
                          const std::string& prefix = "optimizer.") const = 0;
  // Restores state written by save_state of the same optimizer kind over the same parameters.
  // Throws ModelError naming the tensor or setting that does not match.
  virtual void load_state(const io::SafetensorsFile& file,
                          const std::string& prefix = "optimizer.") = 0;

 protected:
  void check_gradient(size_t index, const torch::Tensor& grad) const;
  // Throws ModelError unless metadata `key` exists and equals `expected`.
  static void expect_metadata(const io::SafetensorsFile& file, const std::string& key,
                              const std::string& expected);
  // Copies checkpoint tensor `key` into `destination` after checking dtype and element count.
  static void load_tensor_into(const io::SafetensorsFile& file, const std::string& key,
                               torch::Tensor& destination);

  NamedParameters parameters_;
  OptimizerOptions options_;
};

// "adamw" (fp32 states, torch.optim.AdamW semantics) or "adamw8bit" (blockwise 8-bit states).
// Throws ConfigError for any other name, listing the valid ones.
std::unique_ptr<Optimizer> make_optimizer(const std::string& name, NamedParameters parameters,
                                          const OptimizerOptions& options);

// Optimizer-state bytes for parameters with these element counts, for memory estimates
// (--dry-run) without allocating anything; they equal state_bytes() of a constructed optimizer.
int64_t adamw_state_bytes(const std::vector<int64_t>& numels);
int64_t adamw8bit_state_bytes(const std::vector<int64_t>& numels, int64_t min_8bit_size = 4096);

}  // namespace sdtrain::optim
