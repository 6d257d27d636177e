#include "sdtrain/models/attention.h"

namespace sdtrain::models {

GEGLUImpl::GEGLUImpl(int64_t dim_in, int64_t dim_out) {
  proj = register_module("proj", LoRALinear(torch::nn::LinearOptions(dim_in, dim_out * 2)));
}

torch::Tensor GEGLUImpl::forward(const torch::Tensor& x) {
  auto halves = proj(x).chunk(2, -1);  // value, gate: [.., dim_out] each
  return halves[0] * torch::gelu(halves[1]);
}

FeedForwardImpl::FeedForwardImpl(int64_t dim, int64_t mult) {
  const int64_t inner = dim * mult;
  net_0 = GEGLU(dim, inner);
  net_2 = LoRALinear(torch::nn::LinearOptions(inner, dim));
  net = register_module("net", torch::nn::ModuleList(net_0, torch::nn::Identity(), net_2));
}

torch::Tensor FeedForwardImpl::forward(const torch::Tensor& x) { return net_2(net_0(x)); }

BasicTransformerBlockImpl::BasicTransformerBlockImpl(const BasicTransformerBlockOptions& o) {
  const int64_t dim = o.dim();
  auto layer_norm = [&] { return torch::nn::LayerNorm(torch::nn::LayerNormOptions({dim}).eps(1e-5)); };
  auto attention = [&](int64_t cross_dim) {
    return Attention(AttentionOptions(dim)
                         .cross_attention_dim(cross_dim)
                         .heads(o.num_attention_heads())
                         .dim_head(o.attention_head_dim())
                         .bias(false)
                         .out_bias(true)
                         .upcast_attention(o.upcast_attention()));
  };
  norm1 = register_module("norm1", layer_norm());
  attn1 = register_module("attn1", attention(0));  // self attention (only_cross_attention false)
  norm2 = register_module("norm2", layer_norm());
  attn2 = register_module("attn2", attention(o.cross_attention_dim()));
  norm3 = register_module("norm3", layer_norm());
  ff = register_module("ff", FeedForward(dim));
}

torch::Tensor BasicTransformerBlockImpl::forward(const torch::Tensor& hidden, const torch::Tensor& context) {
  torch::Tensor h = attn1(norm1(hidden)) + hidden;  // [B, L, dim]
  h = attn2(norm2(h), context) + h;
  return ff(norm3(h)) + h;
}

}  // namespace sdtrain::models
