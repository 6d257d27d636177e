#include "sdtrain/models/resnet.h"

namespace sdtrain::models {

namespace F = torch::nn::functional;

ResnetBlock2DImpl::ResnetBlock2DImpl(const ResnetBlock2DOptions& options_) : options(options_) {
  const int64_t in = options.in_channels(), out = options.out_channels();
  norm1 = register_module("norm1", GroupNormSiLU(torch::nn::GroupNormOptions(options.groups(), in).eps(options.eps())));
  conv1 = register_module("conv1", LoRAConv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1)));
  if (options.temb_channels() > 0) {
    time_emb_proj = register_module("time_emb_proj", LoRALinear(torch::nn::LinearOptions(options.temb_channels(), out)));
  }
  norm2 = register_module("norm2", GroupNormSiLU(torch::nn::GroupNormOptions(options.groups(), out).eps(options.eps())));
  conv2 = register_module("conv2", LoRAConv2d(torch::nn::Conv2dOptions(out, out, 3).padding(1)));
  if (in != out) {
    conv_shortcut = register_module("conv_shortcut", LoRAConv2d(torch::nn::Conv2dOptions(in, out, 1)));
  }
}

torch::Tensor ResnetBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  torch::Tensor h = conv1(norm1(x));  // [B, out, H, W]
  if (time_emb_proj) {
    TORCH_CHECK(temb.defined(), "ResnetBlock2D: this block needs a time embedding");
    // SiLU inside each resnet (resnet_skip_time_act = false), broadcast over H and W.
    h = h + time_emb_proj(torch::silu(temb)).unsqueeze(-1).unsqueeze(-1);  // [B, out, 1, 1]
  }
  h = conv2(norm2(h));
  torch::Tensor shortcut = conv_shortcut ? conv_shortcut(x) : x;
  torch::Tensor out = shortcut + h;
  // x / 1.0 is exact, so skipping it for the SD configs changes no bit.
  if (options.output_scale_factor() != 1.0) out = out / options.output_scale_factor();
  return out;
}

Downsample2DImpl::Downsample2DImpl(int64_t channels, int64_t padding_) : padding(padding_) {
  conv = register_module(
      "conv", LoRAConv2d(torch::nn::Conv2dOptions(channels, channels, 3).stride(2).padding(padding)));
}

torch::Tensor Downsample2DImpl::forward(const torch::Tensor& x) {
  if (padding == 0) {
    // [B, C, H+1, W+1]: zero column on the right, zero row at the bottom (LDM's encoder).
    return conv(F::pad(x, F::PadFuncOptions({0, 1, 0, 1}).mode(torch::kConstant).value(0)));
  }
  return conv(x);
}

Upsample2DImpl::Upsample2DImpl(int64_t channels) {
  conv = register_module("conv", LoRAConv2d(torch::nn::Conv2dOptions(channels, channels, 3).padding(1)));
}

torch::Tensor Upsample2DImpl::forward(const torch::Tensor& x,
                                      const std::optional<std::vector<int64_t>>& output_size) {
  auto options = F::InterpolateFuncOptions().mode(torch::kNearest);
  if (output_size) {
    options.size(*output_size);
  } else {
    options.scale_factor(std::vector<double>{2.0, 2.0});
  }
  return conv(F::interpolate(x, options));
}

}  // namespace sdtrain::models
