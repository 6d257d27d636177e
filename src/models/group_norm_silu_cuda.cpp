#include "group_norm_silu_cuda.h"

#if SDTRAIN_WITH_CUDA

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "sdtrain/models/group_norm_silu_kernels.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/cuda_launch.h"

namespace sdtrain::models::detail {
namespace {

using ::sdtrain::cuda::check_launch;
using ::sdtrain::cuda::cuda_element_type;

constexpr const char* kWho = "fused_group_norm_silu";

// NHWC storage (channels-last convolutions write it): the kernels of that layout take it as it
// is, where making it contiguous would add the transposes channels-last is meant to remove.
at::MemoryFormat layout_of(const torch::Tensor& x) {
  return is_channels_last(x) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

cuda::GroupNormShape shape_of(const torch::Tensor& x, int64_t groups, NormActivation activation) {
  cuda::GroupNormShape shape;
  shape.channels_last = is_channels_last(x);
  shape.silu = activation == NormActivation::silu;
  shape.batch = x.size(0);
  shape.channels = x.size(1);
  const int64_t rows = shape.batch * shape.channels;
  shape.hw = rows == 0 ? 0 : x.numel() / rows;
  shape.groups = groups;
  // Called under a CUDAGuard for x's device, so the current device's (cached) properties.
  shape.multiprocessors = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return shape;
}

// The weight and bias as the kernels take them ([C] tensors of one type): the activations' dtype
// when both have it, else float32, so that an fp32 bias beside an fp16 weight is not rounded.
std::pair<torch::Tensor, torch::Tensor> kernel_affine(const torch::Tensor& weight,
                                                      const torch::Tensor& bias,
                                                      const torch::Tensor& x) {
  const bool activation_type =
      weight.scalar_type() == x.scalar_type() && bias.scalar_type() == x.scalar_type();
  const auto type = activation_type ? x.scalar_type() : torch::kFloat;
  return {weight.to(type).contiguous(), bias.to(type).contiguous()};
}

cudaStream_t current_stream(const torch::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}

}  // namespace

bool group_norm_silu_on_cuda(const torch::Tensor& x) {
  const auto type = x.scalar_type();
  return x.is_cuda() && (type == torch::kFloat || type == torch::kHalf || type == torch::kBFloat16);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward_cuda(
    const torch::Tensor& x_in, const torch::Tensor& weight, const torch::Tensor& bias,
    int64_t groups, double eps, NormActivation activation) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const torch::Tensor x = x_in.contiguous(layout_of(x_in));
  const auto [w, b] = kernel_affine(weight, bias, x);
  const auto stats = x.options().dtype(torch::kFloat);
  const cuda::GroupNormShape shape = shape_of(x, groups, activation);
  torch::Tensor workspace = torch::empty({cuda::group_norm_silu_forward_workspace(shape)}, stats);
  torch::Tensor mean = torch::empty({x.size(0), groups}, stats);
  torch::Tensor rstd = torch::empty({x.size(0), groups}, stats);
  torch::Tensor y = torch::empty_like(x, layout_of(x));
  check_launch(cuda::launch_group_norm_silu_forward(
                   cuda_element_type(x.scalar_type(), kWho),
                   cuda_element_type(w.scalar_type(), kWho), shape, x.data_ptr(), w.data_ptr(),
                   b.data_ptr(), static_cast<float>(eps), workspace.data_ptr<float>(),
                   mean.data_ptr<float>(), rstd.data_ptr<float>(), y.data_ptr(),
                   current_stream(x)),
               kWho, "group_norm_silu_forward");
  return {y, mean, rstd};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward_cuda(
    const torch::Tensor& dy_in, const torch::Tensor& x_in, const torch::Tensor& weight,
    const torch::Tensor& bias, const torch::Tensor& mean, const torch::Tensor& rstd, int64_t groups,
    NormActivation activation, bool affine_grads) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const torch::Tensor x = x_in.contiguous(layout_of(x_in));
  const torch::Tensor dy = dy_in.to(x.scalar_type()).contiguous(layout_of(x));
  const auto [w, b] = kernel_affine(weight, bias, x);
  const cuda::GroupNormShape shape = shape_of(x, groups, activation);
  torch::Tensor workspace = torch::empty({cuda::group_norm_silu_backward_workspace(shape)},
                                         x.options().dtype(torch::kFloat));
  torch::Tensor dx = torch::empty_like(x, layout_of(x));
  torch::Tensor grad_weight, grad_bias;
  if (affine_grads) {
    grad_weight = torch::empty_like(w);
    grad_bias = torch::empty_like(w);
  }
  check_launch(cuda::launch_group_norm_silu_backward(
                   cuda_element_type(x.scalar_type(), kWho),
                   cuda_element_type(w.scalar_type(), kWho), shape, dy.data_ptr(), x.data_ptr(),
                   w.data_ptr(), b.data_ptr(), mean.contiguous().data_ptr<float>(),
                   rstd.contiguous().data_ptr<float>(), workspace.data_ptr<float>(), dx.data_ptr(),
                   affine_grads ? grad_weight.data_ptr() : nullptr,
                   affine_grads ? grad_bias.data_ptr() : nullptr, current_stream(x)),
               kWho, "group_norm_silu_backward");
  if (affine_grads) {
    grad_weight = grad_weight.to(weight.scalar_type());
    grad_bias = grad_bias.to(bias.scalar_type());
  }
  return {dx, grad_weight, grad_bias};
}

}  // namespace sdtrain::models::detail

#else  // a build without CUDA kernels

namespace sdtrain::models::detail {

bool group_norm_silu_on_cuda(const torch::Tensor&) { return false; }

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward_cuda(
    const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, int64_t, double,
    NormActivation) {
  TORCH_CHECK(false, "fused_group_norm_silu: this build of sdtrain has no CUDA kernels");
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward_cuda(
    const torch::Tensor&, const torch::Tensor&, const torch::Tensor&, const torch::Tensor&,
    const torch::Tensor&, const torch::Tensor&, int64_t, NormActivation, bool) {
  TORCH_CHECK(false, "fused_group_norm_silu: this build of sdtrain has no CUDA kernels");
}

}  // namespace sdtrain::models::detail

#endif  // SDTRAIN_WITH_CUDA
