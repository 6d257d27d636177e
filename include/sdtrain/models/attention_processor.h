#pragma once
// diffusers attention_processor.py: the Attention module (to_q, to_k, to_v, to_out.0) in the two
// shapes Stable Diffusion uses: the transformer's self/cross attention on [B, L, C] sequences,
// and the VAE mid-block's single-head spatial attention on [B, C, H, W] with its own GroupNorm
// and residual connection.

#include <torch/torch.h>

#include <optional>

#include "sdtrain/models/lora.h"

namespace sdtrain::models {

struct AttentionOptions {
  explicit AttentionOptions(int64_t query_dim) : query_dim_(query_dim) {}
  TORCH_ARG(int64_t, query_dim);
  // Width of encoder_hidden_states for cross attention; 0 = self attention (query_dim).
  TORCH_ARG(int64_t, cross_attention_dim) = 0;
  TORCH_ARG(int64_t, heads) = 8;
  TORCH_ARG(int64_t, dim_head) = 64;
  TORCH_ARG(bool, bias) = false;     // bias of to_q/to_k/to_v
  TORCH_ARG(bool, out_bias) = true;  // bias of to_out.0
  // Compute QK^T (upcast_attention) / the softmax (upcast_softmax) in fp32 when the inputs are
  // fp16/bf16; no effect in fp32.
  TORCH_ARG(bool, upcast_attention) = false;
  TORCH_ARG(bool, upcast_softmax) = false;
  // VAE form: GroupNorm(norm_num_groups, query_dim, eps) before the projections (0 = none).
  TORCH_ARG(int64_t, norm_num_groups) = 0;
  TORCH_ARG(double, eps) = 1e-5;
  TORCH_ARG(bool, residual_connection) = false;
  TORCH_ARG(double, rescale_output_factor) = 1.0;
};

// softmax(Q K^T / sqrt(dim_head)) V over heads, no mask.
// q: [B, heads, L, dh], k/v: [B, heads, S, dh] -> [B, heads, L, dh], in q's dtype.
// Uses at::scaled_dot_product_attention as diffusers' default AttnProcessor2_0 does (fp32
// results match it bit for bit). With `upcast` and fp16/bf16 inputs the attention is computed
// in fp32 (QK^T and softmax in fp32, as diffusers' classic AttnProcessor does with
// upcast_attention/upcast_softmax) and the result cast back.
torch::Tensor dot_product_attention(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, bool upcast);

class AttentionImpl : public torch::nn::Module {
 public:
  explicit AttentionImpl(const AttentionOptions& options);
  // Sequence form: hidden [B, L, query_dim], context [B, S, cross_attention_dim] or undefined
  // (self attention) -> [B, L, query_dim].
  // Spatial form (VAE): hidden [B, C, H, W] -> [B, C, H, W] (sequence of H*W positions).
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& context = {});

  AttentionOptions options;
  torch::nn::GroupNorm group_norm{nullptr};  // VAE only
  // The projections can carry LoRA adapters (lora.h), as diffusers' LoRA targets them.
  LoRALinear to_q{nullptr};
  LoRALinear to_k{nullptr};
  LoRALinear to_v{nullptr};
  // `to_out` is a ModuleList in diffusers: to_out.0 is this Linear; to_out.1 is a Dropout with no
  // weights (p = 0 in SD), not modelled.
  torch::nn::ModuleList to_out{nullptr};
  LoRALinear to_out_0{nullptr};  // == to_out[0]
};
TORCH_MODULE(Attention);

}  // namespace sdtrain::models
