#include "sdtrain/models/embeddings.h"

#include <cmath>

namespace sdtrain::models {

torch::Tensor get_timestep_embedding(const torch::Tensor& timesteps, int64_t dim,
                                     bool flip_sin_to_cos, double downscale_freq_shift,
                                     double scale, double max_period) {
  TORCH_CHECK(timesteps.dim() == 1, "timesteps must be 1-D, got ", timesteps.sizes());
  const int64_t half = dim / 2;
  auto f32 = torch::TensorOptions().dtype(torch::kFloat).device(timesteps.device());
  // Same operation order as diffusers (arange * -ln(max_period), then / (half - shift), then
  // exp) so the fp32 rounding matches bit for bit.
  torch::Tensor exponent = torch::arange(0, half, f32) * (-std::log(max_period));
  exponent = exponent / (static_cast<double>(half) - downscale_freq_shift);
  torch::Tensor emb = timesteps.unsqueeze(1).to(torch::kFloat) * exponent.exp().unsqueeze(0);  // [B, half]
  emb = emb * scale;
  emb = torch::cat({emb.sin(), emb.cos()}, -1);  // [B, 2*half]
  if (flip_sin_to_cos) emb = torch::cat({emb.slice(1, half), emb.slice(1, 0, half)}, -1);
  if (dim % 2 == 1) emb = torch::nn::functional::pad(emb, torch::nn::functional::PadFuncOptions({0, 1, 0, 0}));
  return emb;
}

TimestepsImpl::TimestepsImpl(const TimestepsOptions& options_) : options(options_) {}

torch::Tensor TimestepsImpl::forward(const torch::Tensor& timesteps) {
  return get_timestep_embedding(timesteps, options.num_channels(), options.flip_sin_to_cos(),
                                options.downscale_freq_shift());
}

TimestepEmbeddingImpl::TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim) {
  linear_1 = register_module("linear_1", torch::nn::Linear(in_channels, time_embed_dim));
  linear_2 = register_module("linear_2", torch::nn::Linear(time_embed_dim, time_embed_dim));
}

torch::Tensor TimestepEmbeddingImpl::forward(const torch::Tensor& sample) {
  return linear_2(torch::silu(linear_1(sample)));
}

}  // namespace sdtrain::models
