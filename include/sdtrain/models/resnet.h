#pragma once
// diffusers resnet.py / downsampling.py / upsampling.py: ResnetBlock2D, Downsample2D and
// Upsample2D in the variants Stable Diffusion's UNet and VAE use (pre-norm, SiLU, "default"
// time-embedding addition, no FIR/up-down resnets).

#include <torch/torch.h>

#include <optional>

#include "sdtrain/models/group_norm_silu.h"
#include "sdtrain/models/lora.h"

namespace sdtrain::models {

struct ResnetBlock2DOptions {
  ResnetBlock2DOptions(int64_t in_channels, int64_t out_channels)
      : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  // Width of the time embedding; 0 = no time embedding (the VAE's resnets: no time_emb_proj).
  TORCH_ARG(int64_t, temb_channels) = 512;
  TORCH_ARG(int64_t, groups) = 32;
  TORCH_ARG(double, eps) = 1e-6;
  TORCH_ARG(double, output_scale_factor) = 1.0;
};

// out = (shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))) + proj(silu(temb)))))) / scale
// where shortcut is a 1x1 conv when the channel count changes. diffusers' dropout between
// silu and conv2 is p = 0 in every SD config and has no weights, so it is not modelled.
class ResnetBlock2DImpl : public torch::nn::Module {
 public:
  explicit ResnetBlock2DImpl(const ResnetBlock2DOptions& options);
  // x: [B, in, H, W]; temb: [B, temb_channels] or undefined when temb_channels == 0.
  // Returns [B, out, H, W].
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb = {});

  ResnetBlock2DOptions options;
  GroupNormSiLU norm1{nullptr};  // GroupNorm, then SiLU
  LoRAConv2d conv1{nullptr};
  LoRALinear time_emb_proj{nullptr};  // absent when temb_channels == 0
  GroupNormSiLU norm2{nullptr};  // GroupNorm, then SiLU
  LoRAConv2d conv2{nullptr};
  LoRAConv2d conv_shortcut{nullptr};  // present only when in_channels != out_channels
};
TORCH_MODULE(ResnetBlock2D);

// Strided 3x3 conv (key `conv`). padding 1 in the UNet; the VAE encoder uses padding 0 after
// an asymmetric zero pad of one pixel right and bottom, as diffusers/LDM do.
class Downsample2DImpl : public torch::nn::Module {
 public:
  Downsample2DImpl(int64_t channels, int64_t padding);
  torch::Tensor forward(const torch::Tensor& x);  // [B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]

  int64_t padding;
  LoRAConv2d conv{nullptr};
};
TORCH_MODULE(Downsample2D);

// Nearest-neighbour x2 (or to `output_size`, which the UNet passes when the latent size is not a
// multiple of its total down factor) followed by a 3x3 conv (key `conv`).
class Upsample2DImpl : public torch::nn::Module {
 public:
  explicit Upsample2DImpl(int64_t channels);
  // [B, C, H, W] -> [B, C, 2H, 2W] or [B, C, output_size[0], output_size[1]]
  torch::Tensor forward(const torch::Tensor& x,
                        const std::optional<std::vector<int64_t>>& output_size = std::nullopt);

  LoRAConv2d conv{nullptr};
};
TORCH_MODULE(Upsample2D);

}  // namespace sdtrain::models
