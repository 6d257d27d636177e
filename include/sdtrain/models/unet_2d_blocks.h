#pragma once
// diffusers unets/unet_2d_blocks.py: the down/mid/up blocks of SD's UNet2DConditionModel
// (CrossAttnDownBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D, CrossAttnUpBlock2D)
// and of its AutoencoderKL (DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D).

#include <torch/torch.h>

#include <optional>
#include <vector>

#include "sdtrain/models/resnet.h"
#include "sdtrain/models/transformer_2d.h"

namespace sdtrain::models {

// Options shared by the UNet blocks (each block reads the fields it needs).
struct UNetBlockOptions {
  UNetBlockOptions(int64_t in_channels, int64_t out_channels) : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  // Up blocks: channels of the block below (input of resnet 0 before the skip is concatenated).
  TORCH_ARG(int64_t, prev_output_channel) = 0;
  TORCH_ARG(int64_t, temb_channels) = 1280;
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(double, resnet_eps) = 1e-5;
  TORCH_ARG(int64_t, resnet_groups) = 32;
  TORCH_ARG(double, output_scale_factor) = 1.0;
  TORCH_ARG(bool, add_downsample) = true;
  TORCH_ARG(int64_t, downsample_padding) = 1;
  TORCH_ARG(bool, add_upsample) = true;
  // Cross-attention blocks.
  TORCH_ARG(int64_t, num_attention_heads) = 1;
  TORCH_ARG(int64_t, transformer_layers_per_block) = 1;
  TORCH_ARG(int64_t, cross_attention_dim) = 1280;
  TORCH_ARG(bool, use_linear_projection) = false;
  TORCH_ARG(bool, upcast_attention) = false;
};

// Output of a down block: its hidden state and the skip tensors it hands to the up path
// (the output after each resnet(+attention) pair, then the downsampler's output).
struct DownBlockOutput {
  torch::Tensor hidden;
  std::vector<torch::Tensor> res_samples;
};

// Common part of the UNet blocks: resnets and optional attentions, with per-resnet and
// per-transformer-block gradient checkpointing as diffusers does.
class UNetBlockBase : public torch::nn::Module {
 public:
  // Recomputes each resnet and each transformer block in backward when grad mode is on.
  void set_gradient_checkpointing(bool enabled);
  bool gradient_checkpointing() const { return gradient_checkpointing_; }

 protected:
  torch::Tensor run_resnet(std::size_t index, const torch::Tensor& x, const torch::Tensor& temb);
  torch::Tensor run_attention(std::size_t index, const torch::Tensor& x, const torch::Tensor& context);
  void build_resnets(const std::vector<ResnetBlock2DOptions>& options);
  void build_attentions(std::size_t count, const UNetBlockOptions& o);

 public:
  torch::nn::ModuleList resnets{nullptr};
  std::vector<ResnetBlock2D> resnet_list;          // == resnets, typed
  torch::nn::ModuleList attentions{nullptr};       // cross-attention blocks only
  std::vector<Transformer2DModel> attention_list;  // == attentions, typed

 private:
  bool gradient_checkpointing_ = false;
};

// resnet -> transformer, num_layers times; then an optional strided-conv downsampler.
class CrossAttnDownBlock2DImpl : public UNetBlockBase {
 public:
  explicit CrossAttnDownBlock2DImpl(const UNetBlockOptions& options);
  // x [B, in, H, W], temb [B, T], context [B, S, D] -> hidden [B, out, H', W'] + skips
  DownBlockOutput forward(const torch::Tensor& x, const torch::Tensor& temb, const torch::Tensor& context);

  torch::nn::ModuleList downsamplers{nullptr};
  Downsample2D downsampler{nullptr};  // == downsamplers[0]
};
TORCH_MODULE(CrossAttnDownBlock2D);

class DownBlock2DImpl : public UNetBlockBase {
 public:
  explicit DownBlock2DImpl(const UNetBlockOptions& options);
  DownBlockOutput forward(const torch::Tensor& x, const torch::Tensor& temb);

  torch::nn::ModuleList downsamplers{nullptr};
  Downsample2D downsampler{nullptr};
};
TORCH_MODULE(DownBlock2D);

// resnet0 -> (transformer -> resnet) x num_layers, at constant channels (in_channels).
class UNetMidBlock2DCrossAttnImpl : public UNetBlockBase {
 public:
  explicit UNetMidBlock2DCrossAttnImpl(const UNetBlockOptions& options);
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& temb, const torch::Tensor& context);
};
TORCH_MODULE(UNetMidBlock2DCrossAttn);

// For each resnet: cat([hidden, skip], dim 1) (hidden first) -> resnet; then an optional
// nearest x2 upsampler (to `upsample_size` when given). Skips are taken from the end of
// `res_samples`, which is shortened accordingly.
class UpBlock2DImpl : public UNetBlockBase {
 public:
  explicit UpBlock2DImpl(const UNetBlockOptions& options);
  torch::Tensor forward(const torch::Tensor& x, std::vector<torch::Tensor>& res_samples, const torch::Tensor& temb,
                        const std::optional<std::vector<int64_t>>& upsample_size = std::nullopt);

  torch::nn::ModuleList upsamplers{nullptr};
  Upsample2D upsampler{nullptr};  // == upsamplers[0]
};
TORCH_MODULE(UpBlock2D);

class CrossAttnUpBlock2DImpl : public UNetBlockBase {
 public:
  explicit CrossAttnUpBlock2DImpl(const UNetBlockOptions& options);
  torch::Tensor forward(const torch::Tensor& x, std::vector<torch::Tensor>& res_samples, const torch::Tensor& temb,
                        const torch::Tensor& context,
                        const std::optional<std::vector<int64_t>>& upsample_size = std::nullopt);

  torch::nn::ModuleList upsamplers{nullptr};
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(CrossAttnUpBlock2D);

// ---- VAE blocks: resnets without time embedding, GroupNorm eps 1e-6 ----

struct VAEBlockOptions {
  VAEBlockOptions(int64_t in_channels, int64_t out_channels) : in_channels_(in_channels), out_channels_(out_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, out_channels);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(double, resnet_eps) = 1e-6;
  TORCH_ARG(int64_t, resnet_groups) = 32;
  TORCH_ARG(bool, add_sample) = true;  // downsampler (encoder) / upsampler (decoder)
  TORCH_ARG(int64_t, downsample_padding) = 0;
};

class DownEncoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit DownEncoderBlock2DImpl(const VAEBlockOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // [B, in, H, W] -> [B, out, H/2, W/2] (or H, W)

  torch::nn::ModuleList resnets{nullptr};
  std::vector<ResnetBlock2D> resnet_list;
  torch::nn::ModuleList downsamplers{nullptr};
  Downsample2D downsampler{nullptr};
};
TORCH_MODULE(DownEncoderBlock2D);

class UpDecoderBlock2DImpl : public torch::nn::Module {
 public:
  explicit UpDecoderBlock2DImpl(const VAEBlockOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // [B, in, H, W] -> [B, out, 2H, 2W] (or H, W)

  torch::nn::ModuleList resnets{nullptr};
  std::vector<ResnetBlock2D> resnet_list;
  torch::nn::ModuleList upsamplers{nullptr};
  Upsample2D upsampler{nullptr};
};
TORCH_MODULE(UpDecoderBlock2D);

struct UNetMidBlock2DOptions {
  explicit UNetMidBlock2DOptions(int64_t in_channels) : in_channels_(in_channels) {}
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(double, resnet_eps) = 1e-6;
  TORCH_ARG(int64_t, resnet_groups) = 32;
  TORCH_ARG(bool, add_attention) = true;
  // Channels per head of the single spatial attention (SD VAE: in_channels, i.e. one head).
  TORCH_ARG(int64_t, attention_head_dim) = 0;  // 0 = in_channels
};

// resnet0 -> attention (GroupNorm + residual, softmax upcast) -> resnet1, no time embedding.
class UNetMidBlock2DImpl : public torch::nn::Module {
 public:
  explicit UNetMidBlock2DImpl(const UNetMidBlock2DOptions& options);
  torch::Tensor forward(const torch::Tensor& x);  // [B, C, H, W] -> [B, C, H, W]

  torch::nn::ModuleList resnets{nullptr};
  std::vector<ResnetBlock2D> resnet_list;
  torch::nn::ModuleList attentions{nullptr};  // absent when add_attention is false
  std::vector<Attention> attention_list;
};
TORCH_MODULE(UNetMidBlock2D);

}  // namespace sdtrain::models
