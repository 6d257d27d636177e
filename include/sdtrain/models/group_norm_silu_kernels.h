#pragma once
// Launchers of the fused GroupNorm + SiLU CUDA kernels (src/models/group_norm_silu.cu). Plain
// pointers, sizes and a stream: no torch header, so nvcc stays fast. The torch-facing checks
// live in src/models/group_norm_silu_cuda.cpp; the formulas, and the CPU reference the GPU
// test compares against, in src/models/group_norm_silu.cpp.
//
// Layout: x, y, dy and dx are contiguous NCHW, seen as [batch, channels, hw], or, with
// channels_last set, contiguous NHWC, seen as [batch, hw, channels]; the `groups` groups split
// the channels evenly. mean and rstd are fp32 [batch, groups]. The weight and
// bias are [channels] of weight_type, which is float32 or the activations' type. The
// workspaces are fp32 device memory of the sizes below.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "sdtrain/util/cuda_element_type.h"

namespace sdtrain::models::cuda {

using ::sdtrain::cuda::ElementType;

struct GroupNormShape {
  int64_t batch = 0;
  int64_t channels = 0;
  int64_t hw = 0;  // elements per channel (H * W)
  int64_t groups = 0;
  // Of the device that runs the kernels: how many tiles each walk is cut into follows from it
  // (the caller reads it from torch's cached device properties, not once per launch).
  int64_t multiprocessors = 0;
  // NHWC storage (torch's channels_last), as convolutions in channels-last produce it.
  bool channels_last = false;
  // SiLU after the normalisation; false: the GroupNorm alone (an attention block's, whose
  // output goes to a projection), y = z and dz = dy in the formulas.
  bool silu = true;
};

// Floats of workspace the forward pass needs (each group's partial moments).
int64_t group_norm_silu_forward_workspace(const GroupNormShape& shape);

// y = silu(group_norm(x)), and the per-group mean and 1/sqrt(var + eps) backward needs.
// Three launches: partial moments of each group's tiles, their merge, and the element-wise
// normalisation and activation.
cudaError_t launch_group_norm_silu_forward(ElementType x_type, ElementType weight_type,
                                           const GroupNormShape& shape, const void* x,
                                           const void* weight, const void* bias, float eps,
                                           float* workspace, float* mean, float* rstd, void* y,
                                           cudaStream_t stream);

// Floats of workspace the backward pass needs (each row's partial sums, each group's
// coefficients).
int64_t group_norm_silu_backward_workspace(const GroupNormShape& shape);

// dx (and, when grad_weight is not null, grad_weight and grad_bias in weight_type) from dy.
// Three launches: per-channel sums, per-group coefficients with the affine gradients, and the
// element-wise input gradient, which recomputes the activation from x.
cudaError_t launch_group_norm_silu_backward(ElementType x_type, ElementType weight_type,
                                            const GroupNormShape& shape, const void* dy,
                                            const void* x, const void* weight, const void* bias,
                                            const float* mean, const float* rstd, float* workspace,
                                            void* dx, void* grad_weight, void* grad_bias,
                                            cudaStream_t stream);

}  // namespace sdtrain::models::cuda
