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
#include "sdtrain/train/device_readback.h"
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
  // Before each backward pass; `last_of_step`: the pass that completes the step's gradients.
  virtual void before_backward(bool /*last_of_step*/) {}
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
// min(1, max_norm / (norm + 1e-6)) when max_norm > 0. Returns the norm before clipping as a
// float32 [1] tensor on the gradients' device (zero without gradients): no host read.
torch::Tensor clip_gradient_norm_on_device(const std::vector<torch::Tensor>& gradients,
                                           double max_norm);

struct UpdateOptions {
  double max_grad_norm = 1.0;
  Precision precision = Precision::fp32;
  LrScheduleOptions lr;
  // Appended to the divergence error (e.g. where the last good checkpoint is); asked only then.
  std::function<std::string()> recovery_hint;
};

// Error(training_diverged) for inf/NaN gradients at the step after `global_step` without loss
// scaling, naming what to change and options.recovery_hint().
[[noreturn]] void throw_diverged(int64_t global_step, const UpdateOptions& options);

// The update as the trainer drives it: begin_step before the first micro-batch of a step,
// apply after its last backward pass, settle once the next step's forward pass is queued (and
// before anything reads the weights, the optimizer state or the step's figures: checkpoints,
// validation, the end). Two policies: UpdateAfterBackward (every gradient held, then one step)
// and FusedBackwardUpdate (each parameter stepped inside the backward pass).
//
// No host synchronisation in apply (docs/performance.md): whether the step overflowed is
// decided on the device (the optimizer skips on a device flag), and the step's figures go
// to the host through a DeviceReadback that settle reads a forward pass later. settle then does
// what needs the host to know: it takes back the step counts of a skipped step, averages EMA
// (after the weights it averages were stepped, before the next step changes them), and ends a
// run whose gradients went inf/NaN without loss scaling (after an unfused step the weights are
// those before it: it was skipped on the device).
class UpdatePolicy {
 public:
  UpdatePolicy(const TrainedSet& trained, std::unique_ptr<optim::Optimizer> optimizer,
               LossScaler& scaler, EMAModel* ema, UpdateOptions options)
      : trained_(trained),
        optimizer_(std::move(optimizer)),
        scaler_(scaler),
        ema_(ema),
        options_(std::move(options)) {}
  virtual ~UpdatePolicy() = default;
  UpdatePolicy(const UpdatePolicy&) = delete;
  UpdatePolicy& operator=(const UpdatePolicy&) = delete;
  // Before the micro-batches of the step after `global_step` steps.
  virtual void begin_step(int64_t global_step) = 0;
  // Before each micro-batch's backward pass; `ends_step`: the step's last.
  virtual void before_backward(bool /*ends_step*/) {}
  // The step after `global_step` steps: applies the accumulated gradients (or finishes what the
  // backward pass applied) and clears them, reading nothing on the host. Non-finite gradients
  // skip the step. std::logic_error while the previous step is not settled.
  virtual void apply(int64_t global_step) = 0;
  // What the step apply() queued did, once settled as above; nullopt when none is pending.
  // Non-finite gradients without loss scaling: Error(training_diverged), with
  // options.recovery_hint() appended.
  std::optional<UpdateResult> settle();
  bool pending() const { return pending_.has_value(); }
  optim::Optimizer& optimizer() { return *optimizer_; }
  // A captured pass (micro_batch_pass.h) keeps the gradients in its graph's buffers, which
  // each replay overwrites: the update then leaves them where they are instead of freeing them.
  void keep_gradients(bool keep) { keep_gradients_ = keep; }

  // What a captured pass needs of the update (micro_batch_pass.h):
  // whether the optimizer steps inside the backward pass (fused), so that the capture holds
  // the steps and each replay needs optimizer().prepare_replay first;
  virtual bool updates_in_backward() const { return false; }
  // dry: the backward pass's steps step nothing (the capture's warm-up and reference passes);
  virtual void set_dry(bool /*dry*/) {}
  // per trained tensor, float64 [n, 2]: its gradient's sum and sum of squares (fused, where
  // the hook has freed it: 0 and the squared norm it recorded);
  virtual torch::Tensor gradient_fingerprint() const;
  // clears what a pass recorded for apply (fused: the overflow flags and the norms).
  virtual void clear_pass_figures() {}

 protected:
  // What apply() leaves for settle: the step, its learning rate, the parameters whose step
  // count advanced before the overflow flag was read, and `figures` (float32 on the device,
  // laid out as the policy's finish() reads them) queued for the host.
  void queue_settlement(int64_t global_step, double lr, std::vector<size_t> counted,
                        const torch::Tensor& figures);
  void require_settled() const;
  struct Pending {
    int64_t global_step = 0;
    double lr = 0;
    std::vector<size_t> counted;
  };
  // The policy's part of settle(), given the figures it queued.
  virtual UpdateResult finish(const Pending& step, const std::vector<float>& figures) = 0;
  // The common ending: retracts `counted` when skipped, then either throws (skipped without loss
  // scaling) or averages EMA (not skipped); returns the result.
  UpdateResult conclude(const Pending& step, bool skipped, double grad_norm, double loss_scale);
  // After a step: the gradients freed, unless kept (keep_gradients).
  void release_gradients() {
    if (!keep_gradients_) optimizer_->zero_grad(true);
  }

  // What both policies work with: the trained set, its optimizer, the loss scale and EMA.
  const TrainedSet& trained_;
  std::unique_ptr<optim::Optimizer> optimizer_;
  LossScaler& scaler_;
  EMAModel* ema_;
  UpdateOptions options_;

 private:
  std::optional<Pending> pending_;
  DeviceReadback figures_;
  bool keep_gradients_ = false;
};

class UpdateAfterBackward final : public UpdatePolicy {
 public:
  UpdateAfterBackward(const TrainedSet& trained, std::unique_ptr<optim::Optimizer> optimizer,
                      LossScaler& scaler, EMAModel* ema, UpdateOptions options,
                      std::unique_ptr<GradientReduction> reduction =
                          std::make_unique<LocalGradients>());

  void begin_step(int64_t) override {}
  void before_backward(bool ends_step) override { reduction_->before_backward(ends_step); }
  void apply(int64_t global_step) override;

 private:
  // figures: [found_inf, grad_norm, loss_scale].
  UpdateResult finish(const Pending& step, const std::vector<float>& figures) override;
  std::unique_ptr<GradientReduction> reduction_;
};

// fused_backward_pass (docs/memory.md): a post-accumulate-grad hook on every trained parameter
// unscales its gradient, records its norm and finiteness on the device, steps the parameter and
// frees the gradient, so at most the gradients of the layers in flight are ever held. What
// needs every gradient at once changes meaning (settled by the plan, docs/memory.md):
//   - max_grad_norm clips each tensor's gradient by its own norm;
//   - under fp16, a tensor whose gradient is inf/NaN is not stepped (weights and moments kept),
//     the tensors stepped before it keep their step, and the scale backs off as usual;
//   - gradient accumulation is refused by the plan (the step needs the whole sum).
// The loss-scale update runs in apply and EMA in settle, as after an unfused step. Without loss
// scaling the hooks step every tensor unflagged (the flag would cost AdamW a copy of each), so
// the run that settle ends on an inf/NaN has stepped it, as before.
class FusedBackwardUpdate final : public UpdatePolicy {
 public:
  FusedBackwardUpdate(const TrainedSet& trained, std::unique_ptr<optim::Optimizer> optimizer,
                      LossScaler& scaler, EMAModel* ema, UpdateOptions options);
  ~FusedBackwardUpdate() override;  // removes the hooks

  void begin_step(int64_t global_step) override;
  void apply(int64_t global_step) override;
  bool updates_in_backward() const override { return true; }
  void set_dry(bool dry) override { dry_ = dry; }
  torch::Tensor gradient_fingerprint() const override;
  void clear_pass_figures() override;

  // The hook's work for optimizer parameter `index` (public for the hook object only).
  void on_gradient(size_t index);

 private:
  // figures: [non_finite per parameter..., grad_norm, loss_scale].
  UpdateResult finish(const Pending& step, const std::vector<float>& figures) override;
  std::vector<torch::Tensor> parameters_;  // the optimizer's, in its order
  // float32 [1] on the device, rewritten in place by begin_step (a captured hook reads it).
  torch::Tensor inverse_scale_;
  torch::Tensor non_finite_;               // float32 [n]: 1 where a gradient held inf/NaN
  torch::Tensor norms_;                    // float32 [n]: each gradient's 2-norm, unclipped
  bool dry_ = false;                       // set_dry
};

// The policy the plan chose: fused or after backward (with `reduction`: a data-parallel run
// reduces across processes; the plan refuses fused_backward_pass there).
std::unique_ptr<UpdatePolicy> make_update_policy(
    bool fused_backward_pass, const TrainedSet& trained,
    std::unique_ptr<optim::Optimizer> optimizer, LossScaler& scaler, EMAModel* ema,
    UpdateOptions options,
    std::unique_ptr<GradientReduction> reduction = std::make_unique<LocalGradients>());

}  // namespace sdtrain::train
