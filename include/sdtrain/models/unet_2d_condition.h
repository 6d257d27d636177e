#pragma once
// diffusers unets/unet_2d_condition.py: UNet2DConditionModel in the configurations Stable
// Diffusion 1.x and 2.x use, with its config.json parsed and validated once.

#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/embeddings.h"
#include "sdtrain/models/group_norm_silu.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_blocks.h"

namespace sdtrain::models {

// The fields of unet/config.json this implementation honours, with diffusers' defaults for
// absent keys. Per-block lists are expanded to one entry per down block (diffusers accepts an
// int for each and repeats it).
struct UNet2DConditionConfig {
  std::optional<int64_t> sample_size;  // latent size the model was trained at (sampler default)
  int64_t in_channels = 4;
  int64_t out_channels = 4;
  bool center_input_sample = false;
  bool flip_sin_to_cos = true;
  double freq_shift = 0.0;
  std::vector<std::string> down_block_types = {"CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                               "CrossAttnDownBlock2D", "DownBlock2D"};
  std::string mid_block_type = "UNetMidBlock2DCrossAttn";
  std::vector<std::string> up_block_types = {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                             "CrossAttnUpBlock2D"};
  std::vector<int64_t> block_out_channels = {320, 640, 1280, 1280};
  std::vector<int64_t> layers_per_block = {2, 2, 2, 2};
  int64_t downsample_padding = 1;
  double mid_block_scale_factor = 1.0;
  int64_t norm_num_groups = 32;
  double norm_eps = 1e-5;
  std::vector<int64_t> cross_attention_dim = {1280, 1280, 1280, 1280};
  std::vector<int64_t> transformer_layers_per_block = {1, 1, 1, 1};
  // Number of heads per down block: the config's `attention_head_dim` (diffusers #2011: the
  // key is misnamed; `num_attention_heads` must stay null).
  std::vector<int64_t> num_attention_heads = {8, 8, 8, 8};
  bool use_linear_projection = false;
  bool upcast_attention = false;
  double resnet_out_scale_factor = 1.0;
  int64_t conv_in_kernel = 3;
  int64_t conv_out_kernel = 3;

  // Parses and validates; `source` names the file in messages. Any value this implementation
  // does not reproduce (class/addition embeddings, time_cond_proj_dim, other block types,
  // resnet_time_scale_shift other than "default", num_attention_heads set, dual or only cross
  // attention, ...) is a ModelError naming the key and the value. Keys this implementation
  // does not know are logged as warnings and ignored (diffusers ignores them too).
  static UNet2DConditionConfig from_json(const nlohmann::json& json, const std::string& source = "unet/config.json");
  static UNet2DConditionConfig from_file(const std::filesystem::path& path);

  int64_t time_embed_dim() const { return block_out_channels.front() * 4; }
};

class UNet2DConditionModelImpl : public torch::nn::Module {
 public:
  explicit UNet2DConditionModelImpl(const UNet2DConditionConfig& config);

  // sample: [B, in_channels, h, w] noisy latents; timestep: [B] or a scalar (int or float,
  // broadcast to the batch); encoder_hidden_states: [B, S, cross_attention_dim] (S = 77 for SD).
  // Returns [B, out_channels, h, w] (noise or velocity, per the scheduler's prediction_type).
  // h and w need not be multiples of 8: the up path then interpolates to the skip sizes.
  torch::Tensor forward(const torch::Tensor& sample, const torch::Tensor& timestep,
                        const torch::Tensor& encoder_hidden_states);

  // Recompute each resnet and each transformer block in backward (diffusers'
  // enable_gradient_checkpointing granularity); only takes effect while grad mode is on.
  void set_gradient_checkpointing(bool enabled);
  bool gradient_checkpointing() const { return gradient_checkpointing_; }

  const UNet2DConditionConfig& config() const { return config_; }

  torch::nn::Conv2d conv_in{nullptr};
  Timesteps time_proj{nullptr};
  TimestepEmbedding time_embedding{nullptr};
  torch::nn::ModuleList down_blocks{nullptr};
  UNetMidBlock2DCrossAttn mid_block{nullptr};
  torch::nn::ModuleList up_blocks{nullptr};
  GroupNormSiLU conv_norm_out{nullptr};  // GroupNorm, then SiLU
  // conv_act: SiLU, no weights.
  torch::nn::Conv2d conv_out{nullptr};

  // Typed views of down_blocks / up_blocks: exactly one pointer of each pair is set per block.
  struct DownEntry {
    CrossAttnDownBlock2D cross_attn{nullptr};
    DownBlock2D plain{nullptr};
  };
  struct UpEntry {
    CrossAttnUpBlock2D cross_attn{nullptr};
    UpBlock2D plain{nullptr};
  };
  std::vector<DownEntry> down_list;
  std::vector<UpEntry> up_list;

 private:
  UNet2DConditionConfig config_;
  bool gradient_checkpointing_ = false;
};
TORCH_MODULE(UNet2DConditionModel);

// Builds the UNet from <component_dir>/config.json and loads its weights (strict: every tensor
// present with its shape, nothing extra; a mismatch is a ModelError naming the tensors).
// variant: "" or e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors.
UNet2DConditionModel load_unet(const std::filesystem::path& component_dir, const LoadOptions& options,
                               const std::string& variant = "");
// Same, for the `unet` component of a model folder.
UNet2DConditionModel load_unet(const io::ModelFolder& folder, const LoadOptions& options,
                               const std::string& variant = "");

}  // namespace sdtrain::models
