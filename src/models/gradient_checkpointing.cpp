#include "sdtrain/models/gradient_checkpointing.h"

#include <ATen/autocast_mode.h>

namespace sdtrain::models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// What backward needs besides the saved inputs; kept in the context as a capsule.
struct CheckpointState : torch::CustomClassHolder {
  CheckpointFn fn;
  std::size_t num_inputs = 0;
  std::vector<torch::Tensor> parameters;
  // Autocast state at forward time, per device type we train on.
  bool autocast_cuda = false;
  at::ScalarType autocast_cuda_dtype = at::kHalf;
  bool autocast_cpu = false;
  at::ScalarType autocast_cpu_dtype = at::kBFloat16;
};

// Sets the autocast state recorded at forward time for the recomputation and puts the
// caller's state back afterwards (backward runs on an autograd thread whose state is default).
class AutocastRestore {
 public:
  explicit AutocastRestore(const CheckpointState& state)
      : cuda_(at::autocast::is_autocast_enabled(at::kCUDA)),
        cuda_dtype_(at::autocast::get_autocast_dtype(at::kCUDA)),
        cpu_(at::autocast::is_autocast_enabled(at::kCPU)),
        cpu_dtype_(at::autocast::get_autocast_dtype(at::kCPU)) {
    at::autocast::set_autocast_enabled(at::kCUDA, state.autocast_cuda);
    at::autocast::set_autocast_dtype(at::kCUDA, state.autocast_cuda_dtype);
    at::autocast::set_autocast_enabled(at::kCPU, state.autocast_cpu);
    at::autocast::set_autocast_dtype(at::kCPU, state.autocast_cpu_dtype);
    changed_ = state.autocast_cuda || state.autocast_cpu;
    if (changed_) at::autocast::increment_nesting();
  }
  ~AutocastRestore() {
    // Casts cached during the recomputation must not outlive it (as torch.autocast's exit).
    if (changed_ && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(at::kCUDA, cuda_);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype_);
    at::autocast::set_autocast_enabled(at::kCPU, cpu_);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype_);
  }
  AutocastRestore(const AutocastRestore&) = delete;
  AutocastRestore& operator=(const AutocastRestore&) = delete;

 private:
  bool cuda_;
  at::ScalarType cuda_dtype_;
  bool cpu_;
  at::ScalarType cpu_dtype_;
  bool changed_ = false;
};

class CheckpointFunction : public torch::autograd::Function<CheckpointFunction> {
 public:
  // `tensors` = inputs followed by parameters: each becomes an edge of the graph node.
  static torch::Tensor forward(AutogradContext* ctx, c10::intrusive_ptr<CheckpointState> state,
                               at::TensorList tensors) {
    std::vector<torch::Tensor> inputs(tensors.begin(), tensors.begin() + state->num_inputs);
    ctx->save_for_backward(inputs);
    ctx->saved_data["state"] = c10::IValue::make_capsule(state);
    torch::NoGradGuard no_grad;  // nothing inside the block is recorded, so nothing is saved
    return state->fn(inputs);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    auto state = c10::static_intrusive_pointer_cast<CheckpointState>(ctx->saved_data["state"].toCapsule());
    variable_list saved = ctx->get_saved_variables();
    const std::size_t n = state->num_inputs;

    std::vector<torch::Tensor> inputs;
    std::vector<torch::Tensor> wrt;        // tensors to differentiate with respect to
    std::vector<std::size_t> wrt_edge;     // their position among the node's tensor edges
    inputs.reserve(n);
    for (std::size_t i = 0; i < n; ++i) {
      torch::Tensor x = saved[i].defined() ? saved[i].detach() : saved[i];
      if (x.defined() && x.is_floating_point() && ctx->needs_input_grad(i)) {
        x.requires_grad_(true);
        wrt.push_back(x);
        wrt_edge.push_back(i);
      }
      inputs.push_back(x);
    }
    for (std::size_t j = 0; j < state->parameters.size(); ++j) {
      if (ctx->needs_input_grad(n + j)) {
        wrt.push_back(state->parameters[j]);
        wrt_edge.push_back(n + j);
      }
    }

    // Slot 0 is the state argument (not a tensor); then one slot per tensor edge.
    variable_list result(1 + n + state->parameters.size());
    if (wrt.empty()) return result;

    torch::Tensor output;
    {
      torch::AutoGradMode enable_grad(true);
      AutocastRestore autocast(*state);
      output = state->fn(inputs);
    }
    variable_list grads = torch::autograd::grad({output}, wrt, {grad_outputs[0]},
                                                /*retain_graph=*/false, /*create_graph=*/false,
                                                /*allow_unused=*/true);
    for (std::size_t k = 0; k < wrt.size(); ++k) result[1 + wrt_edge[k]] = grads[k];
    return result;
  }
};

}  // namespace

torch::Tensor checkpoint(const CheckpointFn& fn, const std::vector<torch::Tensor>& inputs,
                         const std::vector<torch::Tensor>& parameters) {
  auto state = c10::make_intrusive<CheckpointState>();
  state->fn = fn;
  state->num_inputs = inputs.size();
  state->autocast_cuda = at::autocast::is_autocast_enabled(at::kCUDA);
  state->autocast_cuda_dtype = at::autocast::get_autocast_dtype(at::kCUDA);
  state->autocast_cpu = at::autocast::is_autocast_enabled(at::kCPU);
  state->autocast_cpu_dtype = at::autocast::get_autocast_dtype(at::kCPU);
  std::vector<torch::Tensor> tensors(inputs);
  for (const auto& p : parameters) {
    if (p.requires_grad()) {
      state->parameters.push_back(p);
      tensors.push_back(p);
    }
  }
  return CheckpointFunction::apply(state, at::TensorList(tensors));
}

torch::Tensor checkpoint(const CheckpointFn& fn, const std::vector<torch::Tensor>& inputs,
                         const torch::nn::Module& module) {
  return checkpoint(fn, inputs, module.parameters(/*recurse=*/true));
}

}  // namespace sdtrain::models
