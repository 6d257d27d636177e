#include "sdtrain/models/transformer_2d.h"

#include "sdtrain/models/gradient_checkpointing.h"

namespace sdtrain::models {

Transformer2DModelImpl::Transformer2DModelImpl(const Transformer2DModelOptions& options_) : options(options_) {
  const int64_t in = options.in_channels();
  const int64_t inner = options.num_attention_heads() * options.attention_head_dim();
  norm = register_module(
      "norm", FusedGroupNorm(torch::nn::GroupNormOptions(options.norm_num_groups(), in).eps(1e-6)));
  if (options.use_linear_projection()) {
    proj_in_linear = register_module("proj_in", LoRALinear(torch::nn::LinearOptions(in, inner)));
  } else {
    proj_in_conv = register_module("proj_in", LoRAConv2d(torch::nn::Conv2dOptions(in, inner, 1)));
  }
  transformer_blocks = register_module("transformer_blocks", torch::nn::ModuleList());
  for (int64_t i = 0; i < options.num_layers(); ++i) {
    BasicTransformerBlock block(BasicTransformerBlockOptions(inner, options.num_attention_heads(), options.attention_head_dim())
                                    .cross_attention_dim(options.cross_attention_dim())
                                    .upcast_attention(options.upcast_attention()));
    transformer_blocks->push_back(block);
    blocks.push_back(block);
  }
  if (options.use_linear_projection()) {
    proj_out_linear = register_module("proj_out", LoRALinear(torch::nn::LinearOptions(inner, in)));
  } else {
    proj_out_conv = register_module("proj_out", LoRAConv2d(torch::nn::Conv2dOptions(inner, in, 1)));
  }
}

torch::Tensor Transformer2DModelImpl::forward(const torch::Tensor& x, const torch::Tensor& context) {
  const int64_t B = x.size(0), H = x.size(2), W = x.size(3);
  torch::Tensor h = norm(x);  // [B, C, H, W]
  if (proj_in_conv) h = proj_in_conv(h);  // [B, inner, H, W]
  const int64_t inner = h.size(1);
  h = h.permute({0, 2, 3, 1}).reshape({B, H * W, inner});  // [B, HW, inner]
  if (proj_in_linear) h = proj_in_linear(h);

  const bool recompute = gradient_checkpointing && torch::GradMode::is_enabled();
  for (auto& block : blocks) {
    if (recompute) {
      h = checkpoint([block](const std::vector<torch::Tensor>& in) mutable { return block->forward(in[0], in[1]); },
                     {h, context}, *block);
    } else {
      h = block(h, context);
    }
  }

  if (proj_out_linear) h = proj_out_linear(h);  // [B, HW, C]
  const int64_t channels = h.size(2);
  // [B, C, H, W] in the layout of the block's input: NCHW made contiguous as diffusers does
  // (the permuted view is NHWC, and the residual addition takes its first operand's layout, so
  // it would hand NHWC to every following conv); under compute.channels_last the view already
  // is the input's layout, and a copy to NCHW would be transposed back at the next conv.
  h = h.reshape({B, H, W, channels}).permute({0, 3, 1, 2}).contiguous(x.suggest_memory_format());
  if (proj_out_conv) h = proj_out_conv(h);
  return h + x;
}

}  // namespace sdtrain::models
