#pragma once
// Activation (gradient) checkpointing: run a block without keeping its intermediate activations
// and run it again during backward to get them back. This trades about one extra forward of the
// block for the memory of everything the block would otherwise save for backward (for a UNet
// resnet: the GroupNorm/SiLU/conv inputs; for a transformer block: the attention and GEGLU
// inputs). diffusers wraps each ResnetBlock2D and each BasicTransformerBlock this way when
// `enable_gradient_checkpointing()` is on; the UNet here does the same.
//
// Generic by design: the CLIP text encoder reuses it per encoder layer.

#include <torch/torch.h>

#include <functional>
#include <vector>

namespace sdtrain::models {

// The block to run: takes the tensors given as `inputs` (in order) and returns one tensor.
// It is kept until backward and called a second time there, so it must capture what it needs
// by value (module holders are shared pointers: capture them, never references to locals).
using CheckpointFn = std::function<torch::Tensor(const std::vector<torch::Tensor>&)>;

// Runs fn(inputs) under no-grad and returns its output attached to the autograd graph. In
// backward, fn is run again with grad enabled on detached copies of the inputs and the
// gradients are taken with torch::autograd::grad, then returned along the graph's edges:
//   - to every input that requires grad (inputs may also hold integer or frozen tensors),
//   - to every tensor in `parameters` that requires grad (the weights fn uses).
// The parameters are passed explicitly, as graph inputs, rather than reached by a nested
// backward() call: the output then requires grad even when no input does (a frozen embedding
// feeding trainable layers), and outer torch::autograd::grad calls, hooks and gradient
// accumulation see ordinary edges. A parameter fn uses but that is not listed gets no gradient.
//
// What is not restored before the recomputation: the RNG state. The blocks checkpointed in
// this project draw no random numbers (dropout is 0 in every SD config and the loss is computed
// outside the block), so both runs are identical. The autocast state of the forward (CUDA and
// CPU) is restored, so mixed-precision recomputation casts as the original run did.
// Double backward (create_graph) through a checkpoint is not supported.
torch::Tensor checkpoint(const CheckpointFn& fn, const std::vector<torch::Tensor>& inputs,
                         const std::vector<torch::Tensor>& parameters);

// Same, with the parameters of `module` (recursively) that require grad.
torch::Tensor checkpoint(const CheckpointFn& fn, const std::vector<torch::Tensor>& inputs,
                         const torch::nn::Module& module);

}  // namespace sdtrain::models
