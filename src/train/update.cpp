#include "sdtrain/train/update.h"

#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::train {

double clip_gradient_norm(const std::vector<torch::Tensor>& gradients, double max_norm) {
  std::vector<torch::Tensor> norms;
  for (const auto& grad : gradients) {
    if (grad.defined()) {
      norms.push_back(torch::linalg_vector_norm(grad, 2, c10::nullopt, false, c10::nullopt));
    }
  }
  if (norms.empty()) return 0.0;
  const torch::Tensor total =
      torch::linalg_vector_norm(torch::stack(norms), 2, c10::nullopt, false, c10::nullopt);
  if (max_norm > 0) {
    const torch::Tensor coefficient = torch::clamp_max(max_norm / (total + 1e-6), 1.0);
    for (const auto& grad : gradients) {
      if (grad.defined()) grad.mul_(coefficient.to(grad.device(), grad.scalar_type()));
    }
  }
  return total.item<double>();
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

UpdateResult UpdateAfterBackward::apply(int64_t global_step) {
  const std::vector<torch::Tensor> gradients = trained_.gradients();
  // Reduced while still scaled, as DistributedDataParallel does during backward: every process
  // then unscales the same sums and agrees on whether the step is skipped.
  reduction_->reduce(gradients);
  // One host synchronisation, as GradScaler.step has: the finite check decides the step.
  const bool finite = scaler_.unscale_and_check(gradients);
  UpdateResult result;
  result.lr = learning_rate_at(options_.lr, global_step);
  result.loss_scale = scaler_.scale_value();
  if (finite) {
    result.grad_norm = clip_gradient_norm(gradients, options_.max_grad_norm);
    optimizer_->set_lr(result.lr);
    optimizer_->step();
    // diffusers' EMA averages the UNet (its trained part: every weight, or its adapters).
    if (ema_) ema_->step(trained_.component_parameters("unet"));
  } else if (!scaler_.enabled()) {
    throw_diverged(global_step, options_);
  } else {
    result.skipped = true;
  }
  scaler_.update(!finite);
  optimizer_->zero_grad(true);
  return result;
}

}  // namespace sdtrain::train
