#pragma once
// One micro-batch's forward and backward pass, as the trainer's loop runs it: run eagerly, or
// replayed from a CUDA graph (cuda_graphs, docs/performance.md).
//
// Replaying a graph launches the thousands of kernels of a forward and backward pass with one
// call, so the GPU no longer waits for the host to launch them. The captured region is the loss
// (include/sdtrain/train/diffusion_loss.h: the VAE encode without cache_latents, the UNet) and
// its backward pass, with gradient checkpointing where enabled. With the encode in the graph,
// its transient memory is the pool's, reused by the pass as an eager step reuses it. After the
// backward pass, the update (unscale, clip, 8-bit AdamW: a handful of launches) stays eager and
// reads the gradients the replay wrote. Under fused_backward_pass the optimizer steps inside the
// backward pass, from a hook per parameter (update.h): the capture holds those steps, and before
// each replay the optimizer writes their per-step arguments
// (include/sdtrain/optim/captured_arguments.h), once the step before is settled.
//
// What a graph needs, and how the trainer gives it:
//   - static shapes: a micro-batch of another shape (an epoch's short last batch) runs eagerly;
//   - static addresses: the inputs are copied into buffers captured with the graph, and the
//     gradients stay where the capture put them (the update does not free them,
//     UpdateOptions::keep_gradients). The replayed backward writes them rather than adding to
//     them, so gradient accumulation cannot be captured;
//   - no host synchronisation and no host-built tensor in the region: the loss piece is tested
//     under CUDA's sync debug mode (tests/train/diffusion_loss_test.cpp);
//   - no autocast weight-cast cache (it would hold tensors of the graph's memory pool).
// The plan decides whether a run can be captured (cuda_graph_obstacle).

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "sdtrain/train/diffusion_loss.h"
#include "sdtrain/train/mixed_precision.h"
#include "sdtrain/train/update.h"

namespace sdtrain::train {

class MicroBatchPass {
 public:
  virtual ~MicroBatchPass() = default;
  // Queues the loss of `inputs` and the backward pass of scale × loss / accumulation_steps.
  // `before_backward` runs once the forward pass is queued. Returns the loss (float32,
  // detached, on the device) and the latents it used, valid until the next run.
  virtual LossOutput run(const LossInputs& inputs,
                         const std::function<void()>& before_backward) = 0;
  // Gives back the device memory the pass holds between runs that an eager pass would not
  // (call it between settled steps): a captured pass drops its graph, the graph's memory pool
  // and the gradients the graph writes, and captures anew at its next full micro-batch. The
  // trainer calls it before validation, whose sampling would otherwise allocate beside the
  // pool where an eager run reuses the pass's freed blocks.
  virtual void release() {}
};

class EagerPass final : public MicroBatchPass {
 public:
  EagerPass(DiffusionLoss& loss, LossScaler& scaler, int64_t accumulation_steps)
      : loss_(loss), scaler_(scaler), accumulation_steps_(accumulation_steps) {}
  LossOutput run(const LossInputs& inputs, const std::function<void()>& before_backward) override;

 private:
  DiffusionLoss& loss_;
  LossScaler& scaler_;
  int64_t accumulation_steps_;
};

// Why this run cannot be captured, or nullopt when it can: the device is not a GPU, data
// parallel (collectives in the backward pass), fused_backward_pass with an optimizer whose
// steps cannot be captured (all but adamw8bit), gradient accumulation (see above), LoRA
// dropout (`lora_dropout`: 0 unless train_mode is lora).
std::optional<std::string> cuda_graph_obstacle(bool cuda_device, bool data_parallel,
                                               bool fused_backward_pass,
                                               const std::string& optimizer,
                                               int64_t gradient_accumulation_steps,
                                               double lora_dropout);

// Whether an eager pass's loss and gradient fingerprint are all finite: a pass that overflowed
// in fp16 cannot be a replay's reference (CapturedPass then captures on a later micro-batch).
bool reference_is_finite(double loss, const torch::Tensor& gradient_fingerprint);

// Thrown by CapturedPass when the capture, or the check of its first replay, fails.
class CaptureFailed : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The pass from a CUDA graph. The first run captures it:
//   1. three eager passes on a side stream (library handles, workspaces, the autograd engine's
//      first use: work that must not happen in a capture): two on the inputs scaled by 1/2,
//      the third on the real inputs, whose loss and gradient fingerprint are kept;
//   2. the capture of one pass on a static copy of the halved inputs (the warm-up's memory is
//      released first, so it and the graph's pool are never reserved together);
//   3. a check: a replay on the real inputs must give the third pass's loss and, for every
//      trained tensor, its gradient sum and sum of squares, to a relative 1e-3 (the backward
//      convolutions may add in another order from run to run: cuDNN's non-deterministic
//      algorithms differ at about 1e-6; a graph that read stale inputs or wrote elsewhere
//      differs by far more). The replay is the first micro-batch's pass.
// Under fused_backward_pass the warm-up and reference passes are dry (the hooks step nothing,
// UpdatePolicy::set_dry), the fingerprint is each gradient's norm as the hook recorded it, and
// the checked replay is dry too (every captured step skips on a flag): the first micro-batch
// is a second replay, with the real arguments.
// The capture waits, running micro-batches eagerly, while a micro-batch has fewer than the full
// rows (an epoch's short last batch, where a resumed run may start) or while the reference pass
// overflows (fp16 at the scaler's first scale; CaptureFailed after 3 such). CaptureFailed names
// what failed; the trainer then runs eagerly (cuda_graphs "auto") or stops (true). Later runs
// copy the inputs in and replay. CUDA builds only; elsewhere the first run throws CaptureFailed.
// The warm-up allocates on a side stream, which cannot reuse the blocks the default stream has
// cached (class images, latent caching, validation): those go back to the driver first, so that
// the capture reserves no more than an eager pass.
class CapturedPass final : public MicroBatchPass {
 public:
  // `update`'s optimizer holds the trained tensors, whose gradients the pass writes. full_rows:
  // the rows of a full micro-batch (train_batch_size, twice that with prior preservation).
  CapturedPass(DiffusionLoss& loss, LossScaler& scaler, UpdatePolicy& update, int64_t full_rows);
  ~CapturedPass() override;
  LossOutput run(const LossInputs& inputs, const std::function<void()>& before_backward) override;
  void release() override;

 private:
  struct Graph;
  // An eager pass's loss and gradient fingerprint: per trained tensor, [sum, sum of squares].
  struct Reference {
    double loss = 0;
    torch::Tensor gradients;
  };
  // False when the capture waits (the reference pass overflowed).
  bool capture(const LossInputs& inputs);
  // Copies the inputs in and replays; under fused_backward_pass the step before is settled
  // (before_backward) and the optimizer's arguments written first.
  LossOutput replay(const LossInputs& inputs, const std::function<void()>& before_backward);
  void run_warm_up(const LossInputs& warm, const LossInputs& inputs, Reference& reference);
  // After a failed capture, or to release the graph: no graph, no dry or capturing update, no
  // gradients, the pool given back.
  void abandon_capture();
  LossOutput eager(const LossInputs& inputs) {
    return eager_.run(inputs, [] {});
  }
  void check_first_replay(const LossInputs& inputs, const Reference& reference);

  EagerPass eager_;  // the warm-up, the check's reference and batches of another shape
  UpdatePolicy& update_;
  std::unique_ptr<Graph> graph_;
  bool told_of_other_shapes_ = false;
  int64_t captures_ = 0;  // graphs captured so far (release() drops one; the next run recaptures)
  int64_t full_rows_;
  static constexpr int kMostOverflowedReferences = 3;
  int overflowed_references_ = 0;
};

}  // namespace sdtrain::train
