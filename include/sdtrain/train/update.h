#pragma once
// The update: what happens between the last backward pass of an optimizer step and the next
// forward pass, as one policy object (docs/architecture.md):
//   gradient reduction -> unscale and check (fp16) -> clip -> optimizer step -> EMA
//   -> loss-scale update
// with the learning rate of the step set on the optimizer. One object owns the order, so a
// variant that steps each parameter inside the backward pass can replace it whole.

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/ema.h"
#include "sdtrain/train/lr_schedule.h"
#include "sdtrain/train/mixed_precision.h"
#include "sdtrain/train/trained_set.h"

namespace sdtrain::train {

// Combines the gradients of every process before they are unscaled, clipped and applied. A run
// of one process keeps its own (LocalGradients); data-parallel training all-reduces here.
class GradientReduction {
 public:
  virtual ~GradientReduction() = default;
  // `gradients` are still multiplied by the loss scale; undefined entries had no gradient.
  virtual void reduce(const std::vector<torch::Tensor>& gradients) = 0;
};

class LocalGradients final : public GradientReduction {
 public:
  void reduce(const std::vector<torch::Tensor>&) override {}
};

// What one update did, for the progress line and metrics.jsonl.
struct UpdateResult {
  double lr = 0;
  double grad_norm = 0;
  double loss_scale = 1;
  bool skipped = false;  // fp16 overflow: no parameter changed, the scale was halved
};

// torch.nn.utils.clip_grad_norm_: the 2-norm of the per-tensor 2-norms, each gradient scaled by
// min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Returns the norm before clipping.
double clip_gradient_norm(const std::vector<torch::Tensor>& gradients, double max_norm);

struct UpdateOptions {
  double max_grad_norm = 1.0;
  Precision precision = Precision::fp32;
  LrScheduleOptions lr;
  // Appended to the divergence error (e.g. where the last good checkpoint is); asked only then.
  std::function<std::string()> recovery_hint;
};

class UpdatePolicy {
 public:
  // Throws ConfigError for a learning-rate schedule that cannot be built.
  UpdatePolicy(const TrainedSet& trained, std::unique_ptr<optim::Optimizer> optimizer,
               LossScaler& scaler, EMAModel* ema,
               UpdateOptions options,
               std::unique_ptr<GradientReduction> reduction = std::make_unique<LocalGradients>());

  // The step after `global_step` steps: applies the accumulated gradients and clears them.
  // Non-finite gradients skip the step under fp16 loss scaling; without it they mean the
  // run diverged: Error(training_diverged), with options.recovery_hint() appended.
  UpdateResult apply(int64_t global_step);

  optim::Optimizer& optimizer() { return *optimizer_; }
  const optim::Optimizer& optimizer() const { return *optimizer_; }

 private:
  const TrainedSet& trained_;
  std::unique_ptr<optim::Optimizer> optimizer_;
  LossScaler& scaler_;
  EMAModel* ema_;
  UpdateOptions options_;
  std::unique_ptr<GradientReduction> reduction_;
};

}  // namespace sdtrain::train
