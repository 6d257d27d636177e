#pragma once
// diffusers autoencoders/autoencoder_kl.py: AutoencoderKL (the SD VAE) with its config.json.

#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/vae.h"

namespace sdtrain::models {

struct AutoencoderKLConfig {
  int64_t in_channels = 3;
  int64_t out_channels = 3;
  std::vector<int64_t> block_out_channels = {64};
  int64_t layers_per_block = 1;
  int64_t latent_channels = 4;
  int64_t norm_num_groups = 32;
  std::optional<int64_t> sample_size = 32;  // used by diffusers only for tiling
  // Latents are `posterior.sample() * scaling_factor` for the UNet; decode divides by it.
  // 0.18215 when absent (SD 2.1's vae/config.json has no such key).
  double scaling_factor = 0.18215;
  std::optional<double> shift_factor;  // null for SD 1.x/2.x
  bool force_upcast = true;            // pipelines run this VAE in fp32 when sampling in fp16
  bool use_quant_conv = true;
  bool use_post_quant_conv = true;
  bool mid_block_add_attention = true;

  // f: the latents are H/f × W/f for images of H × W (one halving per level but the last).
  int64_t downsampling_factor() const { return int64_t{1} << (block_out_channels.size() - 1); }

  // Parses and validates (ModelError naming the key and value for anything not reproduced:
  // other block types or activations, latents_mean/std, ...).
  static AutoencoderKLConfig from_json(const nlohmann::json& json, const std::string& source = "vae/config.json");
  static AutoencoderKLConfig from_file(const std::filesystem::path& path);
};

class AutoencoderKLImpl : public torch::nn::Module {
 public:
  explicit AutoencoderKLImpl(const AutoencoderKLConfig& config);

  // x: [B, in_channels, H, W] in [-1, 1] -> posterior over [B, latent, H/f, W/f]
  // (f = 2^(levels-1) = 8 for SD). Training latents: encode(x).sample(gen) * scaling_factor.
  DiagonalGaussianDistribution encode(const torch::Tensor& x);
  // z: [B, latent, h, w] (already divided by scaling_factor) -> image [B, out, h*f, w*f],
  // roughly in [-1, 1] (not clamped).
  torch::Tensor decode(const torch::Tensor& z);
  // decode(encode(x).sample(generator)) (or .mode() when sample_posterior is false).
  torch::Tensor forward(const torch::Tensor& x, bool sample_posterior = false,
                        std::optional<at::Generator> generator = std::nullopt);

  const AutoencoderKLConfig& config() const { return config_; }

  Encoder encoder{nullptr};
  Decoder decoder{nullptr};
  torch::nn::Conv2d quant_conv{nullptr};       // 1x1, 2*latent -> 2*latent (if use_quant_conv)
  torch::nn::Conv2d post_quant_conv{nullptr};  // 1x1, latent -> latent (if use_post_quant_conv)

 private:
  AutoencoderKLConfig config_;
};
TORCH_MODULE(AutoencoderKL);

// Checkpoint-key mapping for the VAE: Hub files written before diffusers 0.14 name the
// mid-block attention's projections query/key/value/proj_attn; diffusers renames them to
// to_q/to_k/to_v/to_out.0 at load time. Other keys pass through unchanged.
std::optional<std::string> vae_key_mapper(const std::string& checkpoint_key);

// Builds the VAE from <component_dir>/config.json and loads its weights strictly, accepting
// both attention naming schemes.
AutoencoderKL load_vae(const std::filesystem::path& component_dir, const LoadOptions& options,
                       const std::string& variant = "");
// Same, for the `vae` component of a model folder.
AutoencoderKL load_vae(const io::ModelFolder& folder, const LoadOptions& options, const std::string& variant = "");

}  // namespace sdtrain::models
