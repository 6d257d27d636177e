#include "sdtrain/models/single_file_config.h"

#include <map>

#include "sdtrain/models/describe.h"
#include "sdtrain/util/error.h"

namespace sdtrain::models {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

// The pinned diffusers version whose config layout these files follow (tools/requirements.txt).
constexpr const char* kDiffusersVersion = "0.42.1";

class Shapes {
 public:
  Shapes(const io::SafetensorsHeader& header, fs::path file) : file_(std::move(file)) {
    for (const auto& entry : header.tensors) shapes_.emplace(entry.name, entry.shape);
  }
  bool has(const std::string& key) const { return shapes_.count(key) > 0; }
  // Dimension `dim` of `key`, which must exist with more than `dim` dimensions.
  int64_t dim(const std::string& key, std::size_t dim) const {
    auto it = shapes_.find(key);
    if (it == shapes_.end() || it->second.size() <= dim)
      fail(key + (it == shapes_.end() ? " is missing" : " is " + describe_shape(it->second)));
    return it->second[dim];
  }
  std::size_t rank(const std::string& key) const {
    auto it = shapes_.find(key);
    return it == shapes_.end() ? 0 : it->second.size();
  }
  // How many of `prefix`0`suffix`, `prefix`1`suffix`, ... exist.
  int64_t count(const std::string& prefix, const std::string& suffix) const {
    int64_t n = 0;
    while (has(prefix + std::to_string(n) + suffix)) ++n;
    return n;
  }
  [[noreturn]] void fail(const std::string& why) const {
    throw ModelError(file_.string() + ": " + why +
                     ". sdtrain builds SD 1.x/2.x architectures from the shapes; for another "
                     "one set \"single_file_config\" to a diffusers folder of the same "
                     "architecture (its configs are used, the weights come from the file)");
  }

 private:
  fs::path file_;
  std::map<std::string, std::vector<int64_t>> shapes_;
};

const std::string kUNet = "model.diffusion_model.";
const std::string kVAE = "first_stage_model.";

int64_t divide_exactly(const Shapes& shapes, int64_t channels, int64_t by,
                       const std::string& what) {
  if (by <= 0 || channels % by != 0)
    shapes.fail(std::to_string(channels) + " channels do not split into " + what);
  return channels / by;
}

// Attention heads per down block ("attention_head_dim" in diffusers' UNet config, which holds
// head counts): SD 1.x 8 per block, SD 2.x one per 64 channels; a sidecar may say otherwise.
json unet_heads(const Shapes& shapes, const std::vector<int64_t>& channels, bool sd2,
                const std::optional<LdmSidecar>& sidecar) {
  std::optional<int64_t> heads = sd2 ? std::nullopt : std::optional<int64_t>(8);
  std::optional<int64_t> head_channels = sd2 ? std::optional<int64_t>(64) : std::nullopt;
  if (sidecar && sidecar->num_heads) heads = sidecar->num_heads, head_channels.reset();
  if (sidecar && sidecar->num_head_channels)
    head_channels = sidecar->num_head_channels, heads.reset();
  if (heads) {
    for (int64_t c : channels) divide_exactly(shapes, c, *heads, std::to_string(*heads) + " heads");
    return *heads;
  }
  json per_block = json::array();
  for (int64_t c : channels)
    per_block.push_back(divide_exactly(shapes, c, *head_channels,
                                       "heads of " + std::to_string(*head_channels) + " channels"));
  return per_block;
}

json unet_config(const Shapes& s, bool sd2, bool v_prediction,
                 const std::optional<LdmSidecar>& sidecar) {
  const std::string in = kUNet + "input_blocks.";
  // The first downsampler sits after layers_per_block resnets: input_blocks.(L + 1).0.op.
  int64_t layers = 0;
  while (!s.has(in + std::to_string(layers + 1) + ".0.op.weight")) {
    if (!s.has(in + std::to_string(layers + 1) + ".0.in_layers.2.weight")) break;
    ++layers;
  }
  if (layers == 0) s.fail(in + "1.0.in_layers.2.weight (the first resnet) is missing");
  int64_t levels = 0;
  std::vector<int64_t> channels;
  json down = json::array(), up = json::array();
  while (s.has(in + std::to_string(1 + levels * (layers + 1)) + ".0.in_layers.2.weight")) {
    const std::string block = in + std::to_string(1 + levels * (layers + 1));
    channels.push_back(s.dim(block + ".0.out_layers.3.weight", 0));
    down.push_back(s.has(block + ".1.proj_in.weight") ? "CrossAttnDownBlock2D" : "DownBlock2D");
    ++levels;
  }
  const std::string out = kUNet + "output_blocks.";
  for (int64_t i = 0; i < levels; ++i)
    up.push_back(s.has(out + std::to_string(i * (layers + 1)) + ".1.proj_in.weight")
                     ? "CrossAttnUpBlock2D"
                     : "UpBlock2D");
  const std::string mid = kUNet + "middle_block.1.";
  if (!s.has(mid + "proj_in.weight"))
    s.fail(mid + "proj_in.weight (the middle attention) is missing");
  const std::string attention = mid + "transformer_blocks.";
  json config = {
      {"_class_name", "UNet2DConditionModel"},
      {"_diffusers_version", kDiffusersVersion},
      {"act_fn", "silu"},
      {"addition_embed_type_num_heads", 64},
      {"attention_head_dim", unet_heads(s, channels, sd2, sidecar)},
      {"attention_type", "default"},
      {"block_out_channels", channels},
      {"center_input_sample", false},
      {"class_embeddings_concat", false},
      {"conv_in_kernel", s.dim(in + "0.0.weight", 2)},
      {"conv_out_kernel", s.dim(kUNet + "out.2.weight", 2)},
      {"cross_attention_dim", s.dim(attention + "0.attn2.to_k.weight", 1)},
      {"down_block_types", down},
      {"downsample_padding", 1},
      {"dropout", 0.0},
      {"dual_cross_attention", false},
      {"flip_sin_to_cos", true},
      {"freq_shift", 0},
      {"in_channels", s.dim(in + "0.0.weight", 1)},
      {"layers_per_block", layers},
      {"mid_block_scale_factor", 1},
      {"mid_block_type", "UNetMidBlock2DCrossAttn"},
      {"norm_eps", 1e-5},
      {"norm_num_groups", 32},
      {"only_cross_attention", false},
      {"out_channels", s.dim(kUNet + "out.2.weight", 0)},
      {"resnet_out_scale_factor", 1.0},
      {"resnet_skip_time_act", false},
      {"resnet_time_scale_shift", "default"},
      {"sample_size", sd2 && v_prediction ? 96 : 64},
      {"time_embedding_type", "positional"},
      {"transformer_layers_per_block", s.count(attention, ".attn1.to_q.weight")},
      {"up_block_types", up},
      {"upcast_attention", sd2 && v_prediction},
      {"use_linear_projection", s.rank(mid + "proj_in.weight") == 2},
  };
  for (int64_t c : channels) divide_exactly(s, c, 32, "32 normalisation groups");
  return config;
}

json vae_config(const Shapes& s, bool sd2, bool v_prediction,
                const std::optional<LdmSidecar>& sidecar) {
  const std::string down = kVAE + "encoder.down.";
  const int64_t levels = s.count(down, ".block.0.conv1.weight");
  if (levels == 0) s.fail(down + "0.block.0.conv1.weight (the VAE encoder) is missing");
  std::vector<int64_t> channels;
  for (int64_t i = 0; i < levels; ++i)
    channels.push_back(s.dim(down + std::to_string(i) + ".block.0.conv2.weight", 0));
  for (int64_t c : channels) divide_exactly(s, c, 32, "32 normalisation groups");
  return {
      {"_class_name", "AutoencoderKL"},
      {"_diffusers_version", kDiffusersVersion},
      {"act_fn", "silu"},
      {"block_out_channels", channels},
      {"down_block_types", std::vector<std::string>(levels, "DownEncoderBlock2D")},
      {"force_upcast", true},
      {"in_channels", s.dim(kVAE + "encoder.conv_in.weight", 1)},
      {"latent_channels", s.dim(kVAE + "decoder.conv_in.weight", 1)},
      {"layers_per_block", s.count(down + "0.block.", ".conv1.weight")},
      {"mid_block_add_attention", s.has(kVAE + "encoder.mid.attn_1.q.weight")},
      {"norm_num_groups", 32},
      {"out_channels", s.dim(kVAE + "decoder.conv_out.weight", 0)},
      {"sample_size", sd2 && v_prediction ? 768 : 512},
      {"scaling_factor", sidecar && sidecar->scale_factor ? *sidecar->scale_factor : 0.18215},
      {"up_block_types", std::vector<std::string>(levels, "UpDecoderBlock2D")},
      {"use_post_quant_conv", s.has(kVAE + "post_quant_conv.weight")},
      {"use_quant_conv", s.has(kVAE + "quant_conv.weight")},
  };
}

json text_encoder_config(const Shapes& s, bool sd2, std::vector<std::string>& notes) {
  const std::string root =
      sd2 ? "cond_stage_model.model." : "cond_stage_model.transformer.text_model.";
  const std::string tokens =
      root + (sd2 ? "token_embedding.weight" : "embeddings.token_embedding.weight");
  const std::string positions =
      root + (sd2 ? "positional_embedding" : "embeddings.position_embedding.weight");
  const std::string layer = root + (sd2 ? "transformer.resblocks." : "encoder.layers.");
  const std::string fc1 = sd2 ? ".mlp.c_fc.weight" : ".mlp.fc1.weight";
  int64_t layers = s.count(layer, fc1);
  // SD 2.x conditions on the penultimate layer of OpenCLIP ViT-H (LDM's FrozenOpenCLIPEmbedder,
  // layer "penultimate"): a file with the whole tower (it holds text_projection) has one layer
  // more than diffusers' text encoder; exporters that start from diffusers write only those.
  if (sd2 && s.has(root + "text_projection")) {
    --layers;
    notes.push_back("text encoder: " + std::to_string(layers) + " of the file's " +
                    std::to_string(layers + 1) +
                    " OpenCLIP layers (SD 2.x uses the penultimate layer's output)");
  }
  if (layers <= 0) s.fail(layer + "0" + fc1 + " (the text encoder's first layer) is missing");
  const int64_t width = s.dim(tokens, 1);
  return {
      {"architectures", {"CLIPTextModel"}},
      {"attention_dropout", 0.0},
      {"bos_token_id", 49406},
      {"dropout", 0.0},
      {"eos_token_id", 49407},
      {"hidden_act", sd2 ? "gelu" : "quick_gelu"},
      {"hidden_size", width},
      {"initializer_factor", 1.0},
      {"initializer_range", 0.02},
      {"intermediate_size", s.dim(layer + "0" + fc1, 0)},
      {"layer_norm_eps", 1e-5},
      {"max_position_embeddings", s.dim(positions, 0)},
      {"model_type", "clip_text_model"},
      {"num_attention_heads", divide_exactly(s, width, 64, "heads of 64 channels")},
      {"num_hidden_layers", layers},
      {"pad_token_id", 1},
      {"projection_dim", sd2 ? 512 : width},
      {"vocab_size", s.dim(tokens, 0)},
  };
}

// The published schedulers: PNDM for the epsilon models (SD 1.5, 2.1-base), DDIM with
// v-prediction for stabilityai/stable-diffusion-2-1; one training noise schedule.
json scheduler_config(const std::string& prediction_type) {
  const bool v = prediction_type == "v_prediction";
  json config = {
      {"_class_name", v ? "DDIMScheduler" : "PNDMScheduler"},
      {"_diffusers_version", kDiffusersVersion},
      {"beta_end", 0.012},
      {"beta_schedule", "scaled_linear"},
      {"beta_start", 0.00085},
      {"clip_sample", false},
      {"num_train_timesteps", 1000},
      {"prediction_type", prediction_type},
      {"set_alpha_to_one", false},
      {"steps_offset", 1},
      {"timestep_spacing", "leading"},
      {"trained_betas", nullptr},
  };
  if (!v) config["skip_prk_steps"] = true;
  return config;
}

std::string choose_prediction_type(const std::string& configured,
                                   const std::optional<LdmSidecar>& sidecar, bool sd2,
                                   std::vector<std::string>& notes) {
  if (!configured.empty()) {
    notes.push_back("prediction type " + configured + " (single_file_prediction_type)");
    return configured;
  }
  if (sidecar && sidecar->prediction_type) {
    notes.push_back("prediction type " + *sidecar->prediction_type + " (sidecar " +
                    sidecar->path.string() + ")");
    return *sidecar->prediction_type;
  }
  notes.push_back(
      sd2 ? "prediction type epsilon: the weights cannot tell; for a 768 v-prediction model "
            "(SD 2.0/2.1-768) set \"single_file_prediction_type\": \"v_prediction\" or put its "
            ".yaml beside the file"
          : "prediction type epsilon (SD 1.x)");
  return "epsilon";
}

}  // namespace

SingleFileConfigs infer_single_file_configs(const io::SafetensorsHeader& header,
                                            const fs::path& file,
                                            const std::string& prediction_type,
                                            const std::optional<LdmSidecar>& sidecar) {
  const io::CheckpointDetection detected = io::detect_checkpoint(header);
  const bool sd2 = detected.kind == io::CheckpointKind::sd2_single_file;
  if (!sd2 && detected.kind != io::CheckpointKind::sd1_single_file)
    throw ModelError(file.string() + ": " + detected.description +
                     "; a single-file base must be Stable Diffusion 1.x or 2.x");
  const Shapes shapes(header, file);
  SingleFileConfigs configs;
  configs.family = detected.kind;
  configs.prediction_type = choose_prediction_type(prediction_type, sidecar, sd2, configs.notes);
  const bool v = configs.prediction_type == "v_prediction";
  configs.unet = unet_config(shapes, sd2, v, sidecar);
  configs.vae = vae_config(shapes, sd2, v, sidecar);
  configs.text_encoder = text_encoder_config(shapes, sd2, configs.notes);
  configs.scheduler = scheduler_config(configs.prediction_type);
  if (sd2 && v)
    configs.notes.push_back("sample size 768 and upcast attention (SD 2.x v-prediction)");
  return configs;
}

}  // namespace sdtrain::models
