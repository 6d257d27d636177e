#pragma once
// diffusers attention.py / activations.py: BasicTransformerBlock with its FeedForward (GEGLU), in
// the form SD 1.x/2.x use (norm_type "layer_norm", self attention then cross attention).

#include <torch/torch.h>

#include "sdtrain/models/attention_processor.h"

namespace sdtrain::models {

// proj: Linear(dim_in, 2*dim_out); out = a * gelu(gate) with (a, gate) = proj(x).chunk(2, -1):
// the first half is the value, the second the gate; exact (erf) GELU.
class GEGLUImpl : public torch::nn::Module {
 public:
  GEGLUImpl(int64_t dim_in, int64_t dim_out);
  torch::Tensor forward(const torch::Tensor& x);  // [.., dim_in] -> [.., dim_out]

  LoRALinear proj{nullptr};
};
TORCH_MODULE(GEGLU);

// net.0 = GEGLU(dim, 4*dim), net.1 = Dropout (no weights, p = 0 in SD; an Identity keeps the
// index), net.2 = Linear(4*dim, dim).
class FeedForwardImpl : public torch::nn::Module {
 public:
  explicit FeedForwardImpl(int64_t dim, int64_t mult = 4);
  torch::Tensor forward(const torch::Tensor& x);  // [B, L, dim] -> [B, L, dim]

  torch::nn::ModuleList net{nullptr};
  GEGLU net_0{nullptr};
  LoRALinear net_2{nullptr};
};
TORCH_MODULE(FeedForward);

struct BasicTransformerBlockOptions {
  BasicTransformerBlockOptions(int64_t dim, int64_t num_attention_heads, int64_t attention_head_dim)
      : dim_(dim), num_attention_heads_(num_attention_heads), attention_head_dim_(attention_head_dim) {}
  TORCH_ARG(int64_t, dim);
  TORCH_ARG(int64_t, num_attention_heads);
  TORCH_ARG(int64_t, attention_head_dim);
  TORCH_ARG(int64_t, cross_attention_dim) = 0;
  TORCH_ARG(bool, upcast_attention) = false;
};

// h = attn1(norm1(h)) + h; h = attn2(norm2(h), context) + h; h = ff(norm3(h)) + h.
// LayerNorms eps 1e-5 with affine weights; q/k/v without bias, to_out.0 with bias.
class BasicTransformerBlockImpl : public torch::nn::Module {
 public:
  explicit BasicTransformerBlockImpl(const BasicTransformerBlockOptions& options);
  // hidden [B, L, dim], context [B, S, cross_attention_dim] -> [B, L, dim]
  torch::Tensor forward(const torch::Tensor& hidden, const torch::Tensor& context);

  torch::nn::LayerNorm norm1{nullptr};
  Attention attn1{nullptr};
  torch::nn::LayerNorm norm2{nullptr};
  Attention attn2{nullptr};
  torch::nn::LayerNorm norm3{nullptr};
  FeedForward ff{nullptr};
};
TORCH_MODULE(BasicTransformerBlock);

}  // namespace sdtrain::models
