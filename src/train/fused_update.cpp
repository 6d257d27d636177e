// fused_backward_pass: the optimizer step inside the backward pass (include/sdtrain/train/
// update.h; why and what changes: docs/memory.md). The hook follows PyTorch's recipe for an
// optimizer in the backward pass (Tensor.register_post_accumulate_grad_hook): it runs once per
// parameter per backward, after every contribution to the gradient has been summed, when no
// node still to run reads the parameter, so stepping it there cannot change another gradient.

#include "sdtrain/train/gradient_hooks.h"
#include "sdtrain/train/update.h"

namespace sdtrain::train {

FusedBackwardUpdate::FusedBackwardUpdate(const TrainedSet& trained,
                                         std::unique_ptr<optim::Optimizer> optimizer,
                                         LossScaler& scaler, EMAModel* ema, UpdateOptions options)
    : UpdatePolicy(trained, std::move(optimizer), scaler, ema, std::move(options)) {
  for (const auto& [name, parameter] : optimizer_->parameters()) parameters_.push_back(parameter);
  TORCH_CHECK(!parameters_.empty(), "fused_backward_pass: nothing is trained");
  const auto on_device =
      torch::TensorOptions().dtype(torch::kFloat32).device(parameters_.front().device());
  non_finite_ = torch::zeros({static_cast<int64_t>(parameters_.size())}, on_device);
  norms_ = torch::zeros({static_cast<int64_t>(parameters_.size())}, on_device);
  inverse_scale_ = scaler_.inverse_scale();
  for (size_t i = 0; i < parameters_.size(); ++i) {
    set_post_accumulate_grad_hook(parameters_[i], [this, i] { on_gradient(i); });
  }
}

FusedBackwardUpdate::~FusedBackwardUpdate() {
  for (const auto& parameter : parameters_)
    set_post_accumulate_grad_hook(parameter, nullptr);
}

void FusedBackwardUpdate::begin_step(int64_t global_step) {
  optimizer_->set_lr(learning_rate_at(options_.lr, global_step));
  inverse_scale_.copy_(scaler_.inverse_scale());
}

torch::Tensor FusedBackwardUpdate::gradient_fingerprint() const {
  torch::NoGradGuard no_grad;
  const torch::Tensor norms = norms_.to(torch::kDouble);
  return torch::stack({torch::zeros_like(norms), norms.square()}, 1);
}

void FusedBackwardUpdate::clear_pass_figures() {
  non_finite_.zero_();
  norms_.zero_();
}

void FusedBackwardUpdate::on_gradient(size_t index) {
  torch::NoGradGuard no_grad;
  torch::Tensor& grad = parameters_[index].mutable_grad();
  if (!grad.defined()) return;
  const torch::Tensor non_finite = non_finite_.narrow(0, static_cast<int64_t>(index), 1);
  LossScaler::unscale_and_flag(grad, non_finite, inverse_scale_);
  const torch::Tensor norm = torch::linalg_vector_norm(grad, 2, c10::nullopt, false, c10::nullopt);
  norms_.narrow(0, static_cast<int64_t>(index), 1).copy_(norm.reshape({1}));
  if (options_.max_grad_norm > 0) {
    // Per tensor: the global norm would need every gradient first (docs/memory.md).
    grad.mul_(torch::clamp_max(options_.max_grad_norm / (norm + 1e-6), 1.0).to(grad.scalar_type()));
  }
  // Under fp16 the device-side flag skips an overflowed tensor without a host read; otherwise
  // an inf/NaN ends the run in apply, so the plain step (no flag) is taken.
  if (!dry_)
    optimizer_->step_parameter(index, grad, scaler_.enabled() ? non_finite : torch::Tensor());
  grad = torch::Tensor();
}

void FusedBackwardUpdate::apply(int64_t global_step) {
  require_settled();
  const torch::Tensor total_norm =
      torch::linalg_vector_norm(norms_, 2, c10::nullopt, false, c10::nullopt).reshape({1});
  const torch::Tensor figures = torch::cat({non_finite_, total_norm, scaler_.scale_snapshot()});
  scaler_.update(non_finite_.amax().reshape({1}));
  non_finite_.zero_();
  norms_.zero_();
  release_gradients();  // parameters the backward pass never reached
  // Every parameter the hooks stepped may have to take its count back; finish() reads which.
  queue_settlement(global_step, learning_rate_at(options_.lr, global_step), {}, figures);
}

UpdateResult FusedBackwardUpdate::finish(const Pending& step, const std::vector<float>& figures) {
  Pending overflowed = step;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    if (figures.at(i) != 0.0f) overflowed.counted.push_back(i);
  }
  // A skipped fused step retracts only the tensors that overflowed: the others were stepped.
  return conclude(overflowed, !overflowed.counted.empty(), figures.at(parameters_.size()),
                  figures.at(parameters_.size() + 1));
}

std::unique_ptr<UpdatePolicy> make_update_policy(bool fused_backward_pass,
                                                 const TrainedSet& trained,
                                                 std::unique_ptr<optim::Optimizer> optimizer,
                                                 LossScaler& scaler, EMAModel* ema,
                                                 UpdateOptions options,
                                                 std::unique_ptr<GradientReduction> reduction) {
  if (fused_backward_pass) {
    // The plan keeps fused off under data parallel (plan.cpp): a fused step cannot wait for
    // another process's gradients.
    if (!dynamic_cast<LocalGradients*>(reduction.get()))
      throw std::logic_error("fused_backward_pass with a gradient reduction across processes");
    return std::make_unique<FusedBackwardUpdate>(trained, std::move(optimizer), scaler, ema,
                                                 std::move(options));
  }
  return std::make_unique<UpdateAfterBackward>(trained, std::move(optimizer), scaler, ema,
                                               std::move(options), std::move(reduction));
}

}  // namespace sdtrain::train
