#include "sdtrain/train/update.h"

#include <cmath>
#include <stdexcept>

#include "sdtrain/train/tensor_groups.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::train {

torch::Tensor clip_gradient_norm_on_device(const std::vector<torch::Tensor>& gradients,
                                           double max_norm) {
  // As torch.nn.utils.clip_grad_norm_ with foreach: per (device, dtype) group, the per-tensor
  // norms in one multi-tensor launch and the clip in another, where one launch per tensor took
  // 1,374 launches for SD 2.1-base (docs/benchmarks.md, the profile). On the CPU the
  // multi-tensor ops run tensor by tensor, the same arithmetic as before. The groups keep the
  // gradients' order; a run's trained tensors share one dtype, so the norms stack as before.
  std::vector<std::vector<torch::Tensor>> groups = group_by_device_and_dtype(gradients);
  if (groups.empty()) return torch::zeros({1}, torch::kFloat32);
  const torch::Device first_device = groups.front().front().device();
  std::vector<torch::Tensor> norms;
  for (const auto& group : groups) {
    for (const auto& norm : at::_foreach_norm(group, 2)) norms.push_back(norm.to(first_device));
  }
  const torch::Tensor total =
      torch::linalg_vector_norm(torch::stack(norms), 2, c10::nullopt, false, c10::nullopt);
  if (max_norm > 0) {
    const torch::Tensor coefficient = torch::clamp_max(max_norm / (total + 1e-6), 1.0);
    for (auto& group : groups) {
      at::_foreach_mul_(group,
                        coefficient.to(group.front().device(), group.front().scalar_type()));
    }
  }
  return total.to(torch::kFloat32).reshape({1});
}

[[noreturn]] void throw_diverged(int64_t global_step, const UpdateOptions& options) {
  throw Error(ExitCode::training_diverged,
              log::str("the gradients became inf/NaN at step ", global_step + 1, " (",
                       to_string(options.precision),
                       "): training diverged. Lower learning_rate, keep max_grad_norm at 1.0, "
                       "or use mixed_precision bf16/no.") +
                  (options.recovery_hint ? options.recovery_hint() : std::string()));
}

UpdateAfterBackward::UpdateAfterBackward(const TrainedSet& trained,
                                         std::unique_ptr<optim::Optimizer> optimizer,
                                         LossScaler& scaler, EMAModel* ema, UpdateOptions options,
                                         std::unique_ptr<GradientReduction> reduction)
    : UpdatePolicy(trained, std::move(optimizer), scaler, ema, std::move(options)),
      reduction_(std::move(reduction)) {}

torch::Tensor UpdatePolicy::gradient_fingerprint() const {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> rows;
  for (const auto& parameter : trained_.parameters()) {
    const torch::Tensor& grad = parameter.grad();
    const torch::Tensor values = grad.defined()
                                     ? grad.to(torch::kDouble)
                                     : torch::zeros({1}, parameter.options().dtype(torch::kDouble));
    rows.push_back(torch::stack({values.sum(), values.pow(2).sum()}));
  }
  return torch::stack(rows);
}

void UpdatePolicy::require_settled() const {
  if (pending_) throw std::logic_error("UpdatePolicy: the previous step was not settled");
}

void UpdatePolicy::queue_settlement(int64_t global_step, double lr, std::vector<size_t> counted,
                                    const torch::Tensor& figures) {
  require_settled();
  figures_.queue(figures.to(torch::kFloat32));
  pending_ = Pending{global_step, lr, std::move(counted)};
}

std::optional<UpdateResult> UpdatePolicy::settle() {
  if (!pending_) return std::nullopt;
  const Pending step = std::move(*pending_);
  pending_.reset();
  return finish(step, figures_.take());
}

UpdateResult UpdatePolicy::conclude(const Pending& step, bool skipped, double grad_norm,
                                    double loss_scale) {
  if (skipped) {
    // The kernels left these untouched; their counts go back, as if never stepped.
    for (size_t index : step.counted) optimizer_->retract_step(index);
    if (!scaler_.enabled()) throw_diverged(step.global_step, options_);
  } else if (ema_) {
    // diffusers' EMA averages the UNet (its trained part: every weight, or its adapters), not
    // after an overflowed step. The weights are still this step's: the next is not applied yet.
    ema_->step(trained_.component_parameters("unet"));
  }
  UpdateResult result;
  result.lr = step.lr;
  result.loss_scale = loss_scale;
  result.skipped = skipped;
  result.grad_norm = skipped || !std::isfinite(grad_norm) ? 0.0 : grad_norm;
  return result;
}

void UpdateAfterBackward::apply(int64_t global_step) {
  require_settled();
  const std::vector<torch::Tensor> gradients = trained_.gradients();
  // Reduced while still scaled, as DistributedDataParallel does during backward: every process
  // then unscales the same sums and agrees on whether the step is skipped.
  reduction_->reduce(gradients);
  const torch::Tensor found_inf = scaler_.unscale(gradients);
  // Clipping an overflowed step's gradients makes them NaN; the step is skipped all the same.
  const torch::Tensor norm = clip_gradient_norm_on_device(gradients, options_.max_grad_norm);
  const torch::Tensor scale = scaler_.scale_snapshot();
  const double lr = learning_rate_at(options_.lr, global_step);
  optimizer_->set_lr(lr);
  std::vector<size_t> counted = optimizer_->step_unless(found_inf);
  const torch::Tensor figures = torch::cat(
      {found_inf.reshape({1}), norm.to(found_inf.device()), scale.to(found_inf.device())});
  scaler_.update(found_inf);
  release_gradients();
  queue_settlement(global_step, lr, std::move(counted), figures);
}

UpdateResult UpdateAfterBackward::finish(const Pending& step, const std::vector<float>& figures) {
  return conclude(step, figures.at(0) != 0.0f, figures.at(1), figures.at(2));
}

}  // namespace sdtrain::train
