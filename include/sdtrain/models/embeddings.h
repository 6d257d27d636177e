#pragma once
// Timestep embeddings of diffusers' embeddings.py: the sinusoidal projection (Timesteps) and
// the two-layer MLP on top of it (TimestepEmbedding).

#include <torch/torch.h>

namespace sdtrain::models {

// Sinusoidal embedding of (possibly fractional) timesteps, as diffusers'
// get_timestep_embedding: frequencies exp(-ln(max_period) * i / (half - shift)), i < half,
// computed in fp32; output cat([sin, cos]) or, with flip_sin_to_cos, cat([cos, sin]).
// timesteps: [B] (any numeric dtype) -> [B, dim] float32.
torch::Tensor get_timestep_embedding(const torch::Tensor& timesteps, int64_t dim,
                                     bool flip_sin_to_cos, double downscale_freq_shift,
                                     double scale = 1.0, double max_period = 10000.0);

struct TimestepsOptions {
  TimestepsOptions(int64_t num_channels) : num_channels_(num_channels) {}
  TORCH_ARG(int64_t, num_channels);
  TORCH_ARG(bool, flip_sin_to_cos) = true;
  TORCH_ARG(double, downscale_freq_shift) = 0.0;
};

// `time_proj`: no weights.
class TimestepsImpl : public torch::nn::Module {
 public:
  explicit TimestepsImpl(const TimestepsOptions& options);
  // [B] -> [B, num_channels] float32 (the caller casts to the model dtype, as diffusers does).
  torch::Tensor forward(const torch::Tensor& timesteps);

  TimestepsOptions options;
};
TORCH_MODULE(Timesteps);

// `time_embedding`: linear_1 -> SiLU -> linear_2 (act_fn "silu", no post-activation, no
// cond_proj: the only variant SD 1.x/2.x configs use).
class TimestepEmbeddingImpl : public torch::nn::Module {
 public:
  TimestepEmbeddingImpl(int64_t in_channels, int64_t time_embed_dim);
  torch::Tensor forward(const torch::Tensor& sample);  // [B, in] -> [B, time_embed_dim]

  torch::nn::Linear linear_1{nullptr};
  torch::nn::Linear linear_2{nullptr};
};
TORCH_MODULE(TimestepEmbedding);

}  // namespace sdtrain::models
