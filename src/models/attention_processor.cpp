#include "sdtrain/models/attention_processor.h"

#include "sdtrain/models/attention_backend.h"

namespace sdtrain::models {

torch::Tensor dot_product_attention(const torch::Tensor& q, const torch::Tensor& k,
                                    const torch::Tensor& v, bool upcast) {
  const bool reduced = q.scalar_type() == torch::kHalf || q.scalar_type() == torch::kBFloat16;
  if (!(upcast && reduced)) return attention_kernel(q, k, v);
  // fp32 scores and softmax: SD 2.1-768 overflows fp16 in QK^T without this (why
  // upcast_attention exists). SDPA on fp32 copies of q, k, v gives that without materialising
  // the [L, S] score matrix (memory-efficient kernels on CUDA); unlike diffusers' classic
  // path it also keeps probs @ V in fp32, which only removes a rounding step.
  // Autocast would cast the fp32 copies straight back to half: step below it for this call.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return attention_kernel(q.to(torch::kFloat), k.to(torch::kFloat), v.to(torch::kFloat))
      .to(q.scalar_type());
}

AttentionImpl::AttentionImpl(const AttentionOptions& options_) : options(options_) {
  const int64_t inner = options.heads() * options.dim_head();
  const int64_t context_dim = options.cross_attention_dim() > 0 ? options.cross_attention_dim() : options.query_dim();
  if (options.norm_num_groups() > 0) {
    group_norm = register_module("group_norm", torch::nn::GroupNorm(torch::nn::GroupNormOptions(
                                                   options.norm_num_groups(), options.query_dim()).eps(options.eps())));
  }
  to_q = register_module("to_q", LoRALinear(torch::nn::LinearOptions(options.query_dim(), inner).bias(options.bias())));
  to_k = register_module("to_k", LoRALinear(torch::nn::LinearOptions(context_dim, inner).bias(options.bias())));
  to_v = register_module("to_v", LoRALinear(torch::nn::LinearOptions(context_dim, inner).bias(options.bias())));
  to_out_0 = LoRALinear(torch::nn::LinearOptions(inner, options.query_dim()).bias(options.out_bias()));
  to_out = register_module("to_out", torch::nn::ModuleList(to_out_0));
}

torch::Tensor AttentionImpl::forward(const torch::Tensor& hidden, const torch::Tensor& context) {
  const bool spatial = hidden.dim() == 4;
  const int64_t B = hidden.size(0);
  torch::Tensor x = hidden;
  if (spatial) x = hidden.flatten(2).transpose(1, 2);  // [B, C, H, W] -> [B, HW, C]
  if (group_norm) x = group_norm(x.transpose(1, 2)).transpose(1, 2);  // GroupNorm wants channels at dim 1

  const torch::Tensor& kv = context.defined() ? context : x;
  const int64_t heads = options.heads(), dh = options.dim_head();
  // [B, L, heads*dh] -> [B, heads, L, dh]
  torch::Tensor q = to_q(x).view({B, -1, heads, dh}).transpose(1, 2);
  torch::Tensor k = to_k(kv).view({B, -1, heads, dh}).transpose(1, 2);
  torch::Tensor v = to_v(kv).view({B, -1, heads, dh}).transpose(1, 2);
  torch::Tensor out = dot_product_attention(q, k, v, options.upcast_attention() || options.upcast_softmax());
  out = out.transpose(1, 2).reshape({B, -1, heads * dh});  // [B, L, heads*dh]
  out = to_out_0(out);                                      // [B, L, query_dim]

  if (spatial) out = out.transpose(1, 2).reshape(hidden.sizes());  // [B, C, H, W]
  if (options.residual_connection()) out = out + hidden;
  if (options.rescale_output_factor() != 1.0) out = out / options.rescale_output_factor();
  return out;
}

}  // namespace sdtrain::models
