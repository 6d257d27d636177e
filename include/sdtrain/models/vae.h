#pragma once
// diffusers autoencoders/vae.py: the VAE's Encoder and Decoder, and the diagonal Gaussian
// posterior the encoder's moments define.

#include <torch/torch.h>

#include <optional>
#include <vector>

#include "sdtrain/models/unet_2d_blocks.h"
#include "sdtrain/models/group_norm_silu.h"

namespace sdtrain::models {

struct VAECoderOptions {
  TORCH_ARG(int64_t, in_channels) = 3;
  TORCH_ARG(int64_t, out_channels) = 3;
  TORCH_ARG(std::vector<int64_t>, block_out_channels) = std::vector<int64_t>{64};
  TORCH_ARG(int64_t, layers_per_block) = 2;
  TORCH_ARG(int64_t, norm_num_groups) = 32;
  TORCH_ARG(bool, mid_block_add_attention) = true;
};

// conv_in -> DownEncoderBlock2D per level (downsampling all but the last) -> UNetMidBlock2D ->
// GroupNorm(eps 1e-6) -> SiLU -> conv_out to 2*latent channels (mean and log-variance).
class EncoderImpl : public torch::nn::Module {
 public:
  // options.out_channels is the latent channel count; conv_out produces twice that.
  explicit EncoderImpl(const VAECoderOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // [B, in, H, W] -> [B, 2*latent, H/f, W/f]

  torch::nn::Conv2d conv_in{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  std::vector<DownEncoderBlock2D> down_list;
  UNetMidBlock2D mid_block{nullptr};
  GroupNormSiLU conv_norm_out{nullptr};  // GroupNorm, then SiLU (diffusers' conv_act)
  torch::nn::Conv2d conv_out{nullptr};
};
TORCH_MODULE(Encoder);

// conv_in -> UNetMidBlock2D -> UpDecoderBlock2D per level (layers_per_block + 1 resnets,
// upsampling all but the last) -> GroupNorm(eps 1e-6) -> SiLU -> conv_out.
class DecoderImpl : public torch::nn::Module {
 public:
  // options.in_channels is the latent channel count.
  explicit DecoderImpl(const VAECoderOptions& options);
  torch::Tensor forward(const torch::Tensor& z);  // [B, latent, h, w] -> [B, out, h*f, w*f]

  torch::nn::Conv2d conv_in{nullptr};
  UNetMidBlock2D mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  std::vector<UpDecoderBlock2D> up_list;
  GroupNormSiLU conv_norm_out{nullptr};  // GroupNorm, then SiLU
  torch::nn::Conv2d conv_out{nullptr};
};
TORCH_MODULE(Decoder);

// N(mean, exp(logvar)) per latent element, from moments [B, 2*latent, h, w] split on dim 1;
// logvar is clamped to [-30, 20] as diffusers/LDM do (keeps exp finite).
class DiagonalGaussianDistribution {
 public:
  explicit DiagonalGaussianDistribution(const torch::Tensor& moments);

  // mean + std * eps with eps ~ N(0, 1) drawn in the moments' dtype as diffusers' randn_tensor
  // does: on the generator's device when one is given (a CPU generator seeded like
  // torch.Generator().manual_seed(s) gives diffusers' numbers), then moved to the moments'
  // device; on that device with its default generator otherwise.
  torch::Tensor sample(std::optional<at::Generator> generator = std::nullopt) const;
  // mean + std * eps, for eps ~ N(0, 1) drawn beforehand in the moments' shape and dtype.
  torch::Tensor sample_from(const torch::Tensor& eps) const { return mean + std * eps; }
  torch::Tensor mode() const { return mean; }
  // KL divergence to N(0, 1), summed over [1, 2, 3] (diffusers' kl()).
  torch::Tensor kl() const;

  torch::Tensor mean;    // [B, latent, h, w]
  torch::Tensor logvar;  // [B, latent, h, w], clamped
  torch::Tensor std;     // exp(0.5 * logvar)
  torch::Tensor var;     // exp(logvar)
};

}  // namespace sdtrain::models
