#include "sdtrain/train/micro_batch_pass.h"

#if SDTRAIN_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <cmath>

#include "sdtrain/util/log.h"

namespace sdtrain::train {

torch::Tensor EagerPass::run(const LossInputs& inputs,
                             const std::function<void()>& before_backward) {
  const torch::Tensor loss = loss_(inputs);
  before_backward();
  // accelerate divides the loss by the accumulation steps before backward.
  scaler_.scale(loss / static_cast<double>(accumulation_steps_)).backward();
  return loss.detach();
}

std::optional<std::string> cuda_graph_obstacle(bool cuda_device, bool data_parallel,
                                               bool fused_backward_pass,
                                               int64_t gradient_accumulation_steps) {
  if (!cuda_device) return "the device is the CPU (CUDA graphs are a GPU feature)";
  if (data_parallel)
    return "data parallel all-reduces gradients from the backward pass (collectives are not "
           "captured)";
  if (fused_backward_pass)
    return "fused_backward_pass steps the optimizer inside the backward pass";
  if (gradient_accumulation_steps > 1)
    return "gradient_accumulation_steps > 1 (a replayed backward pass writes the gradients, it "
           "does not add to them)";
  return std::nullopt;
}

struct CapturedPass::Graph {
#if SDTRAIN_WITH_CUDA
  at::cuda::CUDAGraph graph;
#endif
  LossInputs inputs;   // the static buffers the graph reads
  torch::Tensor loss;  // the loss the graph writes
};

// Capture needs gradient accumulation 1 (cuda_graph_obstacle): the passes divide by nothing.
CapturedPass::CapturedPass(DiffusionLoss& loss, LossScaler& scaler, const TrainedSet& trained)
    : eager_(loss, scaler, 1), trained_(trained) {}

CapturedPass::~CapturedPass() = default;

namespace {

bool same_layout(const torch::Tensor& a, const torch::Tensor& b) {
  return a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type() && a.device() == b.device();
}

bool same_layout(const LossInputs& a, const LossInputs& b) {
  return same_layout(a.latents, b.latents) && same_layout(a.noise, b.noise) &&
         same_layout(a.timesteps, b.timesteps);
}

// Other inputs of the same layout, drawn from no generator: the warm-up and the capture run on
// these, so that the check of the first replay (on the real inputs) shows the graph reads its
// input buffers.
LossInputs halved(const LossInputs& inputs) {
  return {inputs.latents * 0.5, inputs.noise * 0.5, inputs.timesteps.flip({0})};
}

void copy_into(LossInputs& buffers, const LossInputs& inputs) {
  buffers.latents.copy_(inputs.latents, /*non_blocking=*/true);
  buffers.noise.copy_(inputs.noise, /*non_blocking=*/true);
  buffers.timesteps.copy_(inputs.timesteps, /*non_blocking=*/true);
}

// Per trained tensor, its gradient's sum and sum of squares in float64: [n, 2] on the device.
torch::Tensor gradient_fingerprint(const TrainedSet& trained) {
  torch::NoGradGuard no_grad;
  std::vector<torch::Tensor> rows;
  for (const auto& parameter : trained.parameters()) {
    const torch::Tensor& grad = parameter.grad();
    const torch::Tensor values = grad.defined()
                                     ? grad.to(torch::kDouble)
                                     : torch::zeros({1}, parameter.options().dtype(torch::kDouble));
    rows.push_back(torch::stack({values.sum(), values.pow(2).sum()}));
  }
  return torch::stack(rows);
}

void set_gradients_to_none(const TrainedSet& trained) {
  for (auto parameter : trained.parameters()) parameter.mutable_grad() = torch::Tensor();
}

void zero_gradients(const TrainedSet& trained) {
  torch::NoGradGuard no_grad;
  for (const auto& parameter : trained.parameters()) {
    if (parameter.grad().defined()) parameter.mutable_grad().zero_();
  }
}

}  // namespace

torch::Tensor CapturedPass::run(const LossInputs& inputs,
                                const std::function<void()>& before_backward) {
  if (!graph_) {
    capture(inputs);  // its check replays the graph on `inputs`: the first pass is done
    before_backward();
    return graph_->loss;
  }
  if (!same_layout(graph_->inputs, inputs)) {
    if (!told_of_other_shapes_)
      log::info("cuda_graphs: a micro-batch of another shape runs eagerly");
    told_of_other_shapes_ = true;
    // The gradients stay in the graph's buffers: cleared here, added to by the eager pass.
    zero_gradients(trained_);
    return eager_.run(inputs, before_backward);
  }
  copy_into(graph_->inputs, inputs);
#if SDTRAIN_WITH_CUDA
  graph_->graph.replay();
#endif
  before_backward();
  return graph_->loss;
}

void CapturedPass::capture(const LossInputs& inputs) {
#if !SDTRAIN_WITH_CUDA
  (void)inputs;
  throw CaptureFailed("this build of sdtrain has no CUDA support");
#else
  if (!inputs.latents.is_cuda()) throw CaptureFailed("the inputs are not on a GPU");
  try {
    const LossInputs warm = halved(inputs);
    torch::cuda::synchronize();
    c10::cuda::CUDAStream side =
        c10::cuda::getStreamFromPool(/*isHighPriority=*/false, inputs.latents.device().index());
    Reference reference;
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      for (int i = 0; i < 2; ++i) eager(warm);
      // The third warm-up pass is the check's reference: the real inputs, eagerly.
      set_gradients_to_none(trained_);
      reference.loss = eager(inputs).item<double>();
      reference.gradients = gradient_fingerprint(trained_).cpu();
    }
    torch::cuda::synchronize();
    // The capture allocates the gradients in the graph's pool. The warm-up's blocks belong to
    // the side stream: released, so the graph's pool and they are never reserved together.
    set_gradients_to_none(trained_);
    c10::cuda::CUDACachingAllocator::emptyCache();
    graph_ = std::make_unique<Graph>();
    graph_->inputs = {warm.latents.clone(), warm.noise.clone(), warm.timesteps.clone()};
    {
      c10::cuda::CUDAStreamGuard on_side(side);
      graph_->graph.capture_begin();
      try {
        graph_->loss = eager(graph_->inputs);
      } catch (...) {
        try {
          graph_->graph.capture_end();  // ends the stream's capture before the error goes on
        } catch (...) {
        }
        throw;
      }
      graph_->graph.capture_end();
    }
    torch::cuda::synchronize();
    check_first_replay(inputs, reference);
  } catch (const c10::Error& error) {
    graph_.reset();
    set_gradients_to_none(trained_);
    throw CaptureFailed(error.what_without_backtrace());
  } catch (const CaptureFailed&) {
    graph_.reset();
    set_gradients_to_none(trained_);
    throw;
  }
  log::info(
      "cuda_graphs: the forward and backward pass is captured; a replay matched the eager "
      "pass");
#endif
}

void CapturedPass::check_first_replay(const LossInputs& inputs, const Reference& reference) {
#if SDTRAIN_WITH_CUDA
  copy_into(graph_->inputs, inputs);
  graph_->graph.replay();
  const double replayed_loss = graph_->loss.item<double>();
  const torch::Tensor got = gradient_fingerprint(trained_).cpu();
  const torch::Tensor& expected = reference.gradients;
  constexpr double kTolerance = 1e-3;  // why: micro_batch_pass.h
  if (std::abs(replayed_loss - reference.loss) > kTolerance * std::abs(reference.loss) + 1e-12)
    throw CaptureFailed(
        log::str("the replayed loss ", replayed_loss, " differs from the eager ", reference.loss));
  const auto names = trained_.named_parameters();
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
