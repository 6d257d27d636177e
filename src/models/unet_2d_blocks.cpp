#include "sdtrain/models/unet_2d_blocks.h"

#include "sdtrain/models/gradient_checkpointing.h"

namespace sdtrain::models {

// ---- UNetBlockBase ----

void UNetBlockBase::set_gradient_checkpointing(bool enabled) {
  gradient_checkpointing_ = enabled;
  for (auto& attention : attention_list) attention->gradient_checkpointing = enabled;
}

torch::Tensor UNetBlockBase::run_resnet(std::size_t index, const torch::Tensor& x, const torch::Tensor& temb) {
  ResnetBlock2D resnet = resnet_list.at(index);
  if (gradient_checkpointing_ && torch::GradMode::is_enabled()) {
    return checkpoint([resnet](const std::vector<torch::Tensor>& in) mutable { return resnet->forward(in[0], in[1]); },
                      {x, temb}, *resnet);
  }
  return resnet(x, temb);
}

torch::Tensor UNetBlockBase::run_attention(std::size_t index, const torch::Tensor& x, const torch::Tensor& context) {
  // Checkpointing, when on, happens per transformer block inside Transformer2DModel.
  return attention_list.at(index)(x, context);
}

void UNetBlockBase::build_resnets(const std::vector<ResnetBlock2DOptions>& options) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (const auto& o : options) {
    ResnetBlock2D resnet(o);
    resnets->push_back(resnet);
    resnet_list.push_back(resnet);
  }
}

void UNetBlockBase::build_attentions(std::size_t count, const UNetBlockOptions& o) {
  attentions = register_module("attentions", torch::nn::ModuleList());
  const int64_t channels = o.out_channels();
  for (std::size_t i = 0; i < count; ++i) {
    // The head-count quirk: the config's attention_head_dim is the number of heads; the head
    // width is channels / heads.
    Transformer2DModel attention(Transformer2DModelOptions(o.num_attention_heads(), channels / o.num_attention_heads(), channels)
                                     .num_layers(o.transformer_layers_per_block())
                                     .cross_attention_dim(o.cross_attention_dim())
                                     .norm_num_groups(o.resnet_groups())
                                     .use_linear_projection(o.use_linear_projection())
                                     .upcast_attention(o.upcast_attention()));
    attentions->push_back(attention);
    attention_list.push_back(attention);
  }
}

namespace {

ResnetBlock2DOptions unet_resnet(const UNetBlockOptions& o, int64_t in, int64_t out) {
  return ResnetBlock2DOptions(in, out)
      .temb_channels(o.temb_channels())
      .groups(o.resnet_groups())
      .eps(o.resnet_eps())
      .output_scale_factor(o.output_scale_factor());
}

// Down path: resnet 0 maps in -> out, the others out -> out.
std::vector<ResnetBlock2DOptions> down_resnets(const UNetBlockOptions& o) {
  std::vector<ResnetBlock2DOptions> list;
  for (int64_t i = 0; i < o.num_layers(); ++i) list.push_back(unet_resnet(o, i == 0 ? o.in_channels() : o.out_channels(), o.out_channels()));
  return list;
}

// Up path: resnet i sees cat(hidden, skip): hidden has prev_output_channel channels for i == 0,
// out_channels after; the skip has in_channels for the last resnet, out_channels otherwise.
std::vector<ResnetBlock2DOptions> up_resnets(const UNetBlockOptions& o) {
  std::vector<ResnetBlock2DOptions> list;
  for (int64_t i = 0; i < o.num_layers(); ++i) {
    const int64_t skip = i == o.num_layers() - 1 ? o.in_channels() : o.out_channels();
    const int64_t hidden = i == 0 ? o.prev_output_channel() : o.out_channels();
    list.push_back(unet_resnet(o, hidden + skip, o.out_channels()));
  }
  return list;
}

}  // namespace

// ---- Down blocks ----

CrossAttnDownBlock2DImpl::CrossAttnDownBlock2DImpl(const UNetBlockOptions& o) {
  build_resnets(down_resnets(o));
  build_attentions(o.num_layers(), o);
  if (o.add_downsample()) {
    downsampler = Downsample2D(o.out_channels(), o.downsample_padding());
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler));
  }
}

DownBlockOutput CrossAttnDownBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb,
                                                  const torch::Tensor& context) {
  DownBlockOutput out;
  torch::Tensor h = x;
  for (std::size_t i = 0; i < resnet_list.size(); ++i) {
    h = run_resnet(i, h, temb);
    h = run_attention(i, h, context);
    out.res_samples.push_back(h);
  }
  if (downsampler) {
    h = downsampler(h);
    out.res_samples.push_back(h);
  }
  out.hidden = h;
  return out;
}

DownBlock2DImpl::DownBlock2DImpl(const UNetBlockOptions& o) {
  build_resnets(down_resnets(o));
  if (o.add_downsample()) {
    downsampler = Downsample2D(o.out_channels(), o.downsample_padding());
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler));
  }
}

DownBlockOutput DownBlock2DImpl::forward(const torch::Tensor& x, const torch::Tensor& temb) {
  DownBlockOutput out;
  torch::Tensor h = x;
  for (std::size_t i = 0; i < resnet_list.size(); ++i) {
    h = run_resnet(i, h, temb);
    out.res_samples.push_back(h);
  }
  if (downsampler) {
    h = downsampler(h);
    out.res_samples.push_back(h);
  }
  out.hidden = h;
  return out;
}

// ---- Mid block ----

UNetMidBlock2DCrossAttnImpl::UNetMidBlock2DCrossAttnImpl(const UNetBlockOptions& o) {
  const int64_t c = o.in_channels();
  std::vector<ResnetBlock2DOptions> list(static_cast<std::size_t>(o.num_layers() + 1), unet_resnet(o, c, c));
  build_resnets(list);
  build_attentions(o.num_layers(), UNetBlockOptions(o).out_channels(c));
}

torch::Tensor UNetMidBlock2DCrossAttnImpl::forward(const torch::Tensor& x, const torch::Tensor& temb,
                                                   const torch::Tensor& context) {
  torch::Tensor h = run_resnet(0, x, temb);
  for (std::size_t i = 0; i < attention_list.size(); ++i) {
    h = run_attention(i, h, context);
    h = run_resnet(i + 1, h, temb);
  }
  return h;
}

// ---- Up blocks ----

namespace {
torch::Tensor pop_skip(std::vector<torch::Tensor>& res_samples) {
  TORCH_CHECK(!res_samples.empty(), "up block: no skip connection left");
  torch::Tensor skip = res_samples.back();
  res_samples.pop_back();
  return skip;
}
}  // namespace

UpBlock2DImpl::UpBlock2DImpl(const UNetBlockOptions& o) {
  build_resnets(up_resnets(o));
  if (o.add_upsample()) {
    upsampler = Upsample2D(o.out_channels());
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler));
  }
}

torch::Tensor UpBlock2DImpl::forward(const torch::Tensor& x, std::vector<torch::Tensor>& res_samples,
                                     const torch::Tensor& temb, const std::optional<std::vector<int64_t>>& upsample_size) {
  torch::Tensor h = x;
  for (std::size_t i = 0; i < resnet_list.size(); ++i) {
    h = torch::cat({h, pop_skip(res_samples)}, 1);  // [B, hidden + skip, H, W]
    h = run_resnet(i, h, temb);
  }
  if (upsampler) h = upsampler(h, upsample_size);
  return h;
}

CrossAttnUpBlock2DImpl::CrossAttnUpBlock2DImpl(const UNetBlockOptions& o) {
  build_resnets(up_resnets(o));
  build_attentions(o.num_layers(), o);
  if (o.add_upsample()) {
    upsampler = Upsample2D(o.out_channels());
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler));
  }
}

torch::Tensor CrossAttnUpBlock2DImpl::forward(const torch::Tensor& x, std::vector<torch::Tensor>& res_samples,
                                              const torch::Tensor& temb, const torch::Tensor& context,
                                              const std::optional<std::vector<int64_t>>& upsample_size) {
  torch::Tensor h = x;
  for (std::size_t i = 0; i < resnet_list.size(); ++i) {
    h = torch::cat({h, pop_skip(res_samples)}, 1);
    h = run_resnet(i, h, temb);
    h = run_attention(i, h, context);
  }
  if (upsampler) h = upsampler(h, upsample_size);
  return h;
}

// ---- VAE blocks ----

namespace {
ResnetBlock2DOptions vae_resnet(const VAEBlockOptions& o, int64_t in, int64_t out) {
  return ResnetBlock2DOptions(in, out).temb_channels(0).groups(o.resnet_groups()).eps(o.resnet_eps());
}
}  // namespace

DownEncoderBlock2DImpl::DownEncoderBlock2DImpl(const VAEBlockOptions& o) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_layers(); ++i) {
    ResnetBlock2D resnet(vae_resnet(o, i == 0 ? o.in_channels() : o.out_channels(), o.out_channels()));
    resnets->push_back(resnet);
    resnet_list.push_back(resnet);
  }
  if (o.add_sample()) {
    downsampler = Downsample2D(o.out_channels(), o.downsample_padding());
    downsamplers = register_module("downsamplers", torch::nn::ModuleList(downsampler));
  }
}

torch::Tensor DownEncoderBlock2DImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = x;
  for (auto& resnet : resnet_list) h = resnet(h);
  if (downsampler) h = downsampler(h);
  return h;
}

UpDecoderBlock2DImpl::UpDecoderBlock2DImpl(const VAEBlockOptions& o) {
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int64_t i = 0; i < o.num_layers(); ++i) {
    ResnetBlock2D resnet(vae_resnet(o, i == 0 ? o.in_channels() : o.out_channels(), o.out_channels()));
    resnets->push_back(resnet);
    resnet_list.push_back(resnet);
  }
  if (o.add_sample()) {
    upsampler = Upsample2D(o.out_channels());
    upsamplers = register_module("upsamplers", torch::nn::ModuleList(upsampler));
  }
}

torch::Tensor UpDecoderBlock2DImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = x;
  for (auto& resnet : resnet_list) h = resnet(h);
  if (upsampler) h = upsampler(h);
  return h;
}

UNetMidBlock2DImpl::UNetMidBlock2DImpl(const UNetMidBlock2DOptions& o) {
  const int64_t c = o.in_channels();
  const int64_t head_dim = o.attention_head_dim() > 0 ? o.attention_head_dim() : c;
  resnets = register_module("resnets", torch::nn::ModuleList());
  for (int i = 0; i < 2; ++i) {
    ResnetBlock2D resnet(ResnetBlock2DOptions(c, c).temb_channels(0).groups(o.resnet_groups()).eps(o.resnet_eps()));
    resnets->push_back(resnet);
    resnet_list.push_back(resnet);
  }
  if (o.add_attention()) {
    // diffusers: Attention(C, heads=C/head_dim, dim_head=head_dim, bias=True, upcast_softmax=True,
    // norm_num_groups=groups, eps=resnet_eps, residual_connection=True).
    Attention attention(AttentionOptions(c)
                            .heads(c / head_dim)
                            .dim_head(head_dim)
                            .bias(true)
                            .out_bias(true)
                            .upcast_softmax(true)
                            .norm_num_groups(o.resnet_groups())
                            .eps(o.resnet_eps())
                            .residual_connection(true));
    attentions = register_module("attentions", torch::nn::ModuleList(attention));
    attention_list.push_back(attention);
  }
}

torch::Tensor UNetMidBlock2DImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = resnet_list[0](x);
  if (!attention_list.empty()) h = attention_list[0](h);
  return resnet_list[1](h);
}

}  // namespace sdtrain::models
