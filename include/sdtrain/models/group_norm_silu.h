#pragma once
// GroupNorm followed by SiLU: what every resnet of the UNet and the VAE runs before each of its
// convolutions (diffusers resnet.py: norm1 -> nonlinearity -> conv1, norm2 -> nonlinearity ->
// conv2), and the UNet and VAE run before conv_out.
//
// Unfused, under fp16 autocast, torch runs group_norm in fp32 (autocast's fp32 list): a cast of
// the fp16 input, the normalisation, SiLU, each writing an fp32 tensor, and backward keeps the
// fp32 copy and the fp32 normalised tensor. Fused (`compute.fused_group_norm_silu`,
// docs/performance.md) one autograd node reads the input in its own dtype, computes in fp32 and
// writes the activation in the input's dtype (the dtype the next convolution casts it to under
// autocast anyway); backward keeps only the input and two floats per group, and recomputes the
// normalised value. Three CUDA launches each way (src/models/group_norm_silu.cu); off the GPU
// the same formulas run as torch operations, the reference the GPU test compares to.
//
// The same node without the SiLU serves the GroupNorm of each attention block
// (Transformer2DModel's `norm`), whose output goes to a projection: ATen's CUDA group_norm
// makes its input NCHW, so under channels_last it would transpose there, and under autocast it
// writes fp32 where the projection casts back to fp16.

#include <torch/torch.h>

#include <tuple>

namespace sdtrain::models {

// silu(group_norm(x, groups, weight, bias, eps)) as one autograd node. x: [N, C, ...] with C
// divisible by groups; weight, bias: [C]. Returns x's dtype; the gradients come in the dtypes of
// x, weight and bias.
torch::Tensor fused_group_norm_silu(const torch::Tensor& x, const torch::Tensor& weight,
                                    const torch::Tensor& bias, int64_t groups, double eps);
// group_norm(x, groups, weight, bias, eps) as the same node, without the SiLU.
torch::Tensor fused_group_norm(const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& bias, int64_t groups, double eps);

// What the node applies after the normalisation.
enum class NormActivation { none, silu };

// A GroupNorm module (same options, same parameters `weight` and `bias`, so weight keys are
// unchanged) whose forward is group_norm(x), then its activation(): as the fused node when
// `fused` is set, else as torch's operations.
class FusedGroupNormImpl : public torch::nn::GroupNormImpl {
 public:
  using torch::nn::GroupNormImpl::GroupNormImpl;
  torch::Tensor forward(const torch::Tensor& x);
  virtual NormActivation activation() const { return NormActivation::none; }

  bool fused = false;
};
TORCH_MODULE(FusedGroupNorm);

// The same module with SiLU after the normalisation: silu(group_norm(x)).
class GroupNormSiLUImpl : public FusedGroupNormImpl {
 public:
  using FusedGroupNormImpl::FusedGroupNormImpl;
  NormActivation activation() const override { return NormActivation::silu; }
};
TORCH_MODULE(GroupNormSiLU);

// Sets `fused` on every FusedGroupNorm and GroupNormSiLU in `module` (recursively); returns how
// many there are.
int64_t set_fused_group_norm_silu(torch::nn::Module& module, bool fused);

namespace detail {

// The pieces of the autograd node. forward returns (y, mean, rstd), mean and rstd [N, groups]
// in the accumulation dtype (fp32, or fp64 for fp64 input). backward returns (dx, grad_weight,
// grad_bias); the latter two are undefined unless affine_grads. Both run the CUDA kernels for
// CUDA tensors of float32, float16 or bfloat16 in a build with CUDA, and the reference else.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward(
    const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, int64_t groups,
    double eps, NormActivation activation);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
    const torch::Tensor& bias, const torch::Tensor& mean, const torch::Tensor& rstd, int64_t groups,
    NormActivation activation, bool affine_grads);

// The reference: the same formulas as torch operations, on any device.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward_reference(
    const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, int64_t groups,
    double eps, NormActivation activation);
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward_reference(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
    const torch::Tensor& bias, const torch::Tensor& mean, const torch::Tensor& rstd, int64_t groups,
    NormActivation activation, bool affine_grads);

}  // namespace detail
}  // namespace sdtrain::models
