#include "sdtrain/models/vae.h"

namespace sdtrain::models {

namespace {
torch::nn::Conv2d conv3x3(int64_t in, int64_t out) {
  return torch::nn::Conv2d(torch::nn::Conv2dOptions(in, out, 3).padding(1));
}
}  // namespace

EncoderImpl::EncoderImpl(const VAECoderOptions& o) {
  const auto& channels = o.block_out_channels();
  conv_in = register_module("conv_in", conv3x3(o.in_channels(), channels.front()));
  down_blocks = register_module("down_blocks", torch::nn::ModuleList());
  int64_t output_channel = channels.front();
  for (std::size_t i = 0; i < channels.size(); ++i) {
    const int64_t input_channel = output_channel;
    output_channel = channels[i];
    DownEncoderBlock2D block(VAEBlockOptions(input_channel, output_channel)
                                 .num_layers(o.layers_per_block())
                                 .resnet_eps(1e-6)
                                 .resnet_groups(o.norm_num_groups())
                                 .add_sample(i + 1 != channels.size())
                                 .downsample_padding(0));  // asymmetric pad, see Downsample2D
    down_blocks->push_back(block);
    down_list.push_back(block);
  }
  mid_block = register_module("mid_block", UNetMidBlock2D(UNetMidBlock2DOptions(channels.back())
                                                              .resnet_eps(1e-6)
                                                              .resnet_groups(o.norm_num_groups())
                                                              .add_attention(o.mid_block_add_attention())
                                                              .attention_head_dim(channels.back())));
  conv_norm_out = register_module("conv_norm_out", GroupNormSiLU(torch::nn::GroupNormOptions(o.norm_num_groups(), channels.back()).eps(1e-6)));
  conv_out = register_module("conv_out", conv3x3(channels.back(), 2 * o.out_channels()));  // double_z
}

torch::Tensor EncoderImpl::forward(const torch::Tensor& x) {
  torch::Tensor h = conv_in(x);
  for (auto& block : down_list) h = block(h);
  h = mid_block(h);
  return conv_out(conv_norm_out(h));
}

DecoderImpl::DecoderImpl(const VAECoderOptions& o) {
  const auto& channels = o.block_out_channels();
  conv_in = register_module("conv_in", conv3x3(o.in_channels(), channels.back()));
  mid_block = register_module("mid_block", UNetMidBlock2D(UNetMidBlock2DOptions(channels.back())
                                                              .resnet_eps(1e-6)
                                                              .resnet_groups(o.norm_num_groups())
                                                              .add_attention(o.mid_block_add_attention())
                                                              .attention_head_dim(channels.back())));
  up_blocks = register_module("up_blocks", torch::nn::ModuleList());
  int64_t output_channel = channels.back();
  for (std::size_t i = 0; i < channels.size(); ++i) {
    const int64_t prev_output_channel = output_channel;
    output_channel = channels[channels.size() - 1 - i];
    UpDecoderBlock2D block(VAEBlockOptions(prev_output_channel, output_channel)
                               .num_layers(o.layers_per_block() + 1)
                               .resnet_eps(1e-6)
                               .resnet_groups(o.norm_num_groups())
                               .add_sample(i + 1 != channels.size()));
    up_blocks->push_back(block);
    up_list.push_back(block);
  }
  conv_norm_out = register_module("conv_norm_out", GroupNormSiLU(torch::nn::GroupNormOptions(o.norm_num_groups(), channels.front()).eps(1e-6)));
  conv_out = register_module("conv_out", conv3x3(channels.front(), o.out_channels()));
}

torch::Tensor DecoderImpl::forward(const torch::Tensor& z) {
  torch::Tensor h = conv_in(z);  // [B, C_last, h, w]
  h = mid_block(h);
  // diffusers casts to the up blocks' parameter dtype here (for upcast VAEs); one dtype here.
  for (auto& block : up_list) h = block(h);
  return conv_out(conv_norm_out(h));
}

DiagonalGaussianDistribution::DiagonalGaussianDistribution(const torch::Tensor& moments) {
  TORCH_CHECK(moments.dim() == 4 && moments.size(1) % 2 == 0, "DiagonalGaussianDistribution: moments must be [B, 2C, h, w], got ",
              moments.sizes());
  auto halves = moments.chunk(2, 1);
  mean = halves[0];
  logvar = halves[1].clamp(-30.0, 20.0);
  std = (0.5 * logvar).exp();
  var = logvar.exp();
}

torch::Tensor DiagonalGaussianDistribution::sample(std::optional<at::Generator> generator) const {
  torch::Tensor noise;
  if (generator) {
    noise = at::randn(mean.sizes(), *generator, mean.options().device(generator->device())).to(mean.device());
  } else {
    noise = torch::randn(mean.sizes(), mean.options());
  }
  return sample_from(noise);
}

torch::Tensor DiagonalGaussianDistribution::kl() const {
  return 0.5 * torch::sum(mean.pow(2) + var - 1.0 - logvar, {1, 2, 3});
}

}  // namespace sdtrain::models
