#pragma once
// PyTorch's Tensor.register_post_accumulate_grad_hook for the C++ frontend: `on_ready` runs once
// per parameter per backward pass, after every contribution to its gradient has been summed.
// Both the fused update (train/update.h) and data parallel's buckets (train/gradient_buckets.h)
// work from it.

#include <torch/torch.h>

#include <functional>

namespace sdtrain::train {

// Sets the parameter's one post-accumulate-grad hook (replacing any); an empty `on_ready`
// removes it.
void set_post_accumulate_grad_hook(const torch::Tensor& parameter, std::function<void()> on_ready);

}  // namespace sdtrain::train
