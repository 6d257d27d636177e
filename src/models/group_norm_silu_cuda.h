#pragma once
// Torch-facing side of the fused GroupNorm + SiLU CUDA kernels (internal to src/models).

#include <torch/torch.h>

#include <tuple>

#include "sdtrain/models/group_norm_silu.h"

namespace sdtrain::models::detail {

// Whether the CUDA kernels take these tensors: a build with CUDA, x on CUDA in float32,
// float16 or bfloat16.
bool group_norm_silu_on_cuda(const torch::Tensor& x);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward_cuda(
    const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, int64_t groups,
    double eps, NormActivation activation);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward_cuda(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
    const torch::Tensor& bias, const torch::Tensor& mean, const torch::Tensor& rstd, int64_t groups,
    NormActivation activation, bool affine_grads);

}  // namespace sdtrain::models::detail
