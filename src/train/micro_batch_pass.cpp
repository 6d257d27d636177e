#include "sdtrain/train/micro_batch_pass.h"

#if SDTRAIN_WITH_CUDA
#include <ATen/core/CachingHostAllocator.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>

#include "sdtrain/util/log.h"

namespace sdtrain::train {

LossOutput EagerPass::run(const LossInputs& inputs, const std::function<void()>& before_backward) {
  const LossOutput output = loss_(inputs);
  before_backward();
  // accelerate divides the loss by the accumulation steps before backward.
  scaler_.scale(output.loss / static_cast<double>(accumulation_steps_)).backward();
  return {output.loss.detach(), output.latents};
}

std::optional<std::string> cuda_graph_obstacle(bool cuda_device, bool data_parallel,
                                               bool fused_backward_pass,
                                               const std::string& optimizer,
                                               int64_t gradient_accumulation_steps,
                                               double lora_dropout) {
  if (!cuda_device) return "the device is the CPU (CUDA graphs are a GPU feature)";
  if (data_parallel)
    return "data parallel all-reduces gradients from the backward pass (collectives are not "
           "captured)";
  if (fused_backward_pass && optimizer != "adamw8bit")
    return "fused_backward_pass steps the optimizer inside the backward pass, and only "
           "adamw8bit's steps can be captured (optimizer " +
           optimizer + ")";
  if (gradient_accumulation_steps > 1)
    return "gradient_accumulation_steps > 1 (a replayed backward pass writes the gradients, it "
           "does not add to them)";
  if (lora_dropout > 0)
    return "lora_dropout > 0 (each pass draws its dropout masks on the GPU: the check of the "
           "first replay against an eager pass cannot match)";
  return std::nullopt;
}

struct CapturedPass::Graph {
#if SDTRAIN_WITH_CUDA
  at::cuda::CUDAGraph graph;
  // The graph's memory pool, named here so that a failed capture can give it back.
  at::cuda::MempoolId_t pool = at::cuda::graph_pool_handle();
#endif
  LossInputs inputs;  // the static buffers the graph reads
  LossOutput output;  // the loss and latents the graph writes
};

// Capture needs gradient accumulation 1 (cuda_graph_obstacle): the passes divide by nothing.
CapturedPass::CapturedPass(DiffusionLoss& loss, LossScaler& scaler, UpdatePolicy& update,
                           int64_t full_rows)
    : eager_(loss, scaler, 1), update_(update), full_rows_(full_rows) {}

CapturedPass::~CapturedPass() = default;

namespace {

bool same_layout(const torch::Tensor& a, const torch::Tensor& b) {
  if (!a.defined() || !b.defined()) return a.defined() == b.defined();
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device();
}

bool same_layout(const LossInputs& a, const LossInputs& b) {
  for (auto field : LossInputs::kFields) {
    if (!same_layout(a.*field, b.*field)) return false;
  }
  return true;
}

// Other inputs of the same layout, drawn from no generator: the warm-up and the capture run on
// these, so that the check of the first replay (on the real inputs) shows the graph reads its
// input buffers.
LossInputs halved(const LossInputs& inputs) {
  return inputs.map([](const torch::Tensor& tensor) {
    return tensor.is_floating_point() ? tensor * 0.5 : tensor.flip({0});  // the timesteps flip
  });
}

#if SDTRAIN_WITH_CUDA
// Ends the capture; when that fails, leaves the allocator as a failed capture must be left
// before its graph is destroyed, and throws. torch's capture_end stops routing the capture
// stream's allocations to the graph's pool only after cudaStreamEndCapture succeeds; a capture
// the driver invalidated (a synchronisation inside it) would leave the caching allocator
// routing with a filter that points into the destroyed CUDAGraph, and the pool reserved for
// good. When torch did not get that far, this ends the routing and releases the pool (what the
// graph's reset does for a capture that ended), and clears the CUDA error.
void end_capture(at::cuda::CUDAGraph& graph, c10::DeviceIndex device, at::cuda::MempoolId_t pool) {
  try {
    graph.capture_end();
    return;
  } catch (const c10::Error&) {
    (void)cudaGetLastError();
    bool routed = true;
    try {
      c10::cuda::CUDACachingAllocator::endAllocateToPool(device, pool);
    } catch (const c10::Error&) {
      routed = false;  // capture_end got past its end of routing: the reset releases the pool
    }
    if (routed) {
      try {
        at::getHostAllocator(at::kCUDA)->end_allocate_to_pool(pool);
        at::getHostAllocator(at::kCUDA)->release_pool(pool);
      } catch (const c10::Error&) {
      }
      c10::cuda::CUDACachingAllocator::releasePool(device, pool);
    }
    throw;
  }
}
#endif

void copy_into(LossInputs& buffers, const LossInputs& inputs) {
  for (auto field : LossInputs::kFields) {
    if ((inputs.*field).defined()) (buffers.*field).copy_(inputs.*field, /*non_blocking=*/true);
  }
}

}  // namespace

LossOutput CapturedPass::run(const LossInputs& inputs,
                             const std::function<void()>& before_backward) {
  if (!graph_) {
    // A graph is captured for one shape: a resumed run may start on an epoch's short last
    // batch, and every full batch after it would then run eagerly.
    if (inputs.rows() < full_rows_ || !capture(inputs)) {
      update_.optimizer().zero_grad(/*set_to_none=*/true);
      return eager_.run(inputs, before_backward);
    }
    if (!update_.updates_in_backward()) {
      // The check replayed the graph on `inputs`: the first pass is done.
      before_backward();
      return graph_->output;
    }
    return replay(inputs, before_backward);  // the check's replay was dry
  }
  if (!same_layout(graph_->inputs, inputs)) {
    if (!told_of_other_shapes_)
      log::info("cuda_graphs: a micro-batch of another shape runs eagerly");
    told_of_other_shapes_ = true;
    // The gradients stay in the graph's buffers: cleared here, added to by the eager pass.
    update_.optimizer().zero_grad(/*set_to_none=*/false);
    return eager_.run(inputs, before_backward);
  }
  return replay(inputs, before_backward);
}

LossOutput CapturedPass::replay(const LossInputs& inputs,
                                const std::function<void()>& before_backward) {
  const bool steps_inside = update_.updates_in_backward();
  if (steps_inside) {
    // The replay steps the weights: the step before is settled first (an overflow takes its
    // counts back), so that the arguments written now count from the right step.
    before_backward();
    update_.optimizer().prepare_replay(/*dry=*/false);
  }
  copy_into(graph_->inputs, inputs);
#if SDTRAIN_WITH_CUDA
  graph_->graph.replay();
#endif
  if (!steps_inside) before_backward();
  return graph_->output;
}

bool CapturedPass::capture(const LossInputs& inputs) {
#if !SDTRAIN_WITH_CUDA
  (void)inputs;
  throw CaptureFailed("this build of sdtrain has no CUDA support");
#else
  if (!inputs.noise.is_cuda()) throw CaptureFailed("the inputs are not on a GPU");
  // The current device may be another: `device: "cuda:1"` sets none (only data parallel does).
  const c10::DeviceIndex device = inputs.noise.device().index();
  try {
    const LossInputs warm = halved(inputs);
    torch::cuda::synchronize(device);
    c10::cuda::CUDACachingAllocator::emptyCache();  // why: micro_batch_pass.h
    c10::cuda::CUDAStream side =
        c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device);
    Reference reference;
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      run_warm_up(warm, inputs, reference);
    }
    torch::cuda::synchronize(device);
    if (!reference_is_finite(reference.loss, reference.gradients)) {
      // fp16's first steps may overflow at the loss scaler's initial scale; a replay of such a
      // pass has nothing finite to be checked against. This micro-batch runs eagerly (the
      // scaler skips it and lowers the scale) and the capture waits for a finite one.
      abandon_capture();
      if (++overflowed_references_ < kMostOverflowedReferences) return false;
      throw CaptureFailed(log::str("the eager pass overflowed on the first ",
                                   kMostOverflowedReferences,
                                   " micro-batches: no finite pass to check a replay against"));
    }
    // The capture allocates the gradients in the graph's pool. The warm-up's blocks belong to
    // the side stream: released, so the graph's pool and they are never reserved together.
    update_.optimizer().zero_grad(/*set_to_none=*/true);
    c10::cuda::CUDACachingAllocator::emptyCache();
    graph_ = std::make_unique<Graph>();
    graph_->inputs = warm.map([](const torch::Tensor& tensor) { return tensor.clone(); });
    const bool steps_inside = update_.updates_in_backward();
    if (steps_inside) update_.optimizer().begin_graph_capture();
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      graph_->graph.capture_begin(graph_->pool);
      try {
        graph_->output = eager(graph_->inputs);
      } catch (...) {
        try {
          end_capture(graph_->graph, device, graph_->pool);
        } catch (const c10::Error&) {
        }
        throw;  // the pass's error, not the capture's
      }
      end_capture(graph_->graph, device, graph_->pool);
    }
    if (steps_inside) update_.optimizer().end_graph_capture();
    torch::cuda::synchronize(device);
    check_first_replay(inputs, reference);
  } catch (const c10::Error& error) {
    abandon_capture();
    throw CaptureFailed(error.what_without_backtrace());
  } catch (const CaptureFailed&) {
    abandon_capture();
    throw;
  } catch (const std::logic_error& error) {  // an optimizer that cannot be captured
    abandon_capture();
    throw CaptureFailed(error.what());
  }
  if (captures_++ > 0) {
    log::info(
        "cuda_graphs: the pass is captured again (its graph was released); a replay "
        "matched the eager pass");
  } else {
    log::info(update_.updates_in_backward()
                  ? "cuda_graphs: the forward and backward pass is captured, with the optimizer's "
                    "steps in it; a dry replay matched the eager pass"
                  : "cuda_graphs: the forward and backward pass is captured; a replay matched the "
                    "eager pass");
  }
  return true;
#endif
}

bool reference_is_finite(double loss, const torch::Tensor& gradient_fingerprint) {
  return std::isfinite(loss) && torch::isfinite(gradient_fingerprint).all().item<bool>();
}

// The warm-up: two passes on the halved inputs, then the check's reference on the real ones,
// eagerly and dry (under fused_backward_pass the hooks step nothing).
void CapturedPass::run_warm_up(const LossInputs& warm, const LossInputs& inputs,
                               Reference& reference) {
  update_.set_dry(true);
  try {
    for (int i = 0; i < 2; ++i) {
      eager(warm);
      update_.clear_pass_figures();
    }
    update_.optimizer().zero_grad(/*set_to_none=*/true);
    reference.loss = eager(inputs).loss.item<double>();
    reference.gradients = update_.gradient_fingerprint().cpu();
    update_.clear_pass_figures();
  } catch (...) {
    update_.set_dry(false);
    throw;
  }
  update_.set_dry(false);
}

void CapturedPass::release() {
  if (graph_) abandon_capture();
}

void CapturedPass::abandon_capture() {
  graph_.reset();
  update_.set_dry(false);
  update_.optimizer().end_graph_capture();
  update_.clear_pass_figures();
  update_.optimizer().zero_grad(/*set_to_none=*/true);
#if SDTRAIN_WITH_CUDA
  // What the graph's pool held goes back to the device for the eager passes.
  c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

void CapturedPass::check_first_replay(const LossInputs& inputs, const Reference& reference) {
#if SDTRAIN_WITH_CUDA
  copy_into(graph_->inputs, inputs);
  const bool steps_inside = update_.updates_in_backward();
  if (steps_inside) update_.optimizer().prepare_replay(/*dry=*/true);
  graph_->graph.replay();
  const double replayed_loss = graph_->output.loss.item<double>();
  const torch::Tensor got = update_.gradient_fingerprint().cpu();
  if (steps_inside) update_.clear_pass_figures();
  const torch::Tensor& expected = reference.gradients;
  constexpr double kTolerance = 1e-3;  // why: micro_batch_pass.h
  if (std::abs(replayed_loss - reference.loss) > kTolerance * std::abs(reference.loss) + 1e-12)
    throw CaptureFailed(
        log::str("the replayed loss ", replayed_loss, " differs from the eager ", reference.loss));
  const optim::NamedParameters& names = update_.optimizer().parameters();
  for (int64_t i = 0; i < expected.size(0); ++i) {
    const double sum = expected[i][0].item<double>(), squares = expected[i][1].item<double>();
    const double numel = static_cast<double>(names[static_cast<size_t>(i)].second.numel());
    // |sum| is at most sqrt(numel * squares) (Cauchy-Schwarz): the scale of its error.
    const bool sum_ok =
        std::abs(got[i][0].item<double>() - sum) <= kTolerance * std::sqrt(numel * squares) + 1e-30;
    const bool squares_ok =
        std::abs(got[i][1].item<double>() - squares) <= kTolerance * squares + 1e-30;
    if (!sum_ok || !squares_ok)
      throw CaptureFailed("the replayed gradient of " + names[static_cast<size_t>(i)].first +
                          " differs from the eager pass's");
  }
#else
  (void)inputs;
  (void)reference;
#endif
}

}  // namespace sdtrain::train
