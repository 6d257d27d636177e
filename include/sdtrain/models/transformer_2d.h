#pragma once
// diffusers transformers/transformer_2d.py: Transformer2DModel for continuous (latent image)
// inputs, the `attentions.{j}` modules of the UNet's cross-attention blocks.

#include <torch/torch.h>

#include "sdtrain/models/attention.h"
#include "sdtrain/models/group_norm_silu.h"

namespace sdtrain::models {

struct Transformer2DModelOptions {
  Transformer2DModelOptions(int64_t num_attention_heads, int64_t attention_head_dim, int64_t in_channels)
      : num_attention_heads_(num_attention_heads), attention_head_dim_(attention_head_dim), in_channels_(in_channels) {}
  TORCH_ARG(int64_t, num_attention_heads);
  TORCH_ARG(int64_t, attention_head_dim);
  TORCH_ARG(int64_t, in_channels);
  TORCH_ARG(int64_t, num_layers) = 1;
  TORCH_ARG(int64_t, cross_attention_dim) = 0;
  TORCH_ARG(int64_t, norm_num_groups) = 32;
  // SD 2.x: Linear proj_in/proj_out on [B, HW, C]; SD 1.x: 1x1 convs on [B, C, H, W].
  TORCH_ARG(bool, use_linear_projection) = false;
  TORCH_ARG(bool, upcast_attention) = false;
};

// residual = x; x = GroupNorm(x) (eps 1e-6, fixed in diffusers); proj_in; flatten to
// [B, H*W, inner] (row-major over H then W); transformer blocks; proj_out; back to
// [B, C, H, W]; + residual (taken before the norm).
class Transformer2DModelImpl : public torch::nn::Module {
 public:
  explicit Transformer2DModelImpl(const Transformer2DModelOptions& options);
  // x [B, C, H, W], context [B, S, cross_attention_dim] -> [B, C, H, W]
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& context);

  // Recompute each transformer block in backward (as diffusers' Transformer2DModel does).
  bool gradient_checkpointing = false;

  Transformer2DModelOptions options;
  FusedGroupNorm norm{nullptr};  // fused with compute.fused_group_norm_silu
  // Exactly one of each pair exists, registered as "proj_in" / "proj_out" (the key is the same
  // in both checkpoints; only the weight shape differs: [C, C] or [C, C, 1, 1]).
  LoRALinear proj_in_linear{nullptr};
  LoRAConv2d proj_in_conv{nullptr};
  torch::nn::ModuleList transformer_blocks{nullptr};
  std::vector<BasicTransformerBlock> blocks;  // == transformer_blocks, typed
  LoRALinear proj_out_linear{nullptr};
  LoRAConv2d proj_out_conv{nullptr};
};
TORCH_MODULE(Transformer2DModel);

}  // namespace sdtrain::models
