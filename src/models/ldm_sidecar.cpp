// The `.yaml` sidecar of a single-file checkpoint: the original LDM inference config, which
// AUTOMATIC1111 looks for beside a model of the same name (docs/single_file.md). Read with
// yaml-cpp; only the keys that decide what diffusers' configs cannot take from the weights.

#include <yaml-cpp/yaml.h>

#include <sstream>

#include "sdtrain/models/single_file_config.h"
#include "sdtrain/util/error.h"

namespace sdtrain::models {
namespace {

namespace fs = std::filesystem;

YAML::Node child(const YAML::Node& node, std::initializer_list<const char*> path) {
  YAML::Node current = node;
  for (const char* key : path) {
    if (!current.IsMap() || !current[key]) return YAML::Node();
    current = current[key];
  }
  return current;
}

template <typename T>
std::optional<T> scalar(const YAML::Node& node, const fs::path& file, const std::string& key) {
  if (!node) return std::nullopt;
  try {
    return node.as<T>();
  } catch (const YAML::Exception&) {
    throw ModelError(file.string() + ": " + key +
                     " is not a valid value; fix or remove the sidecar");
  }
}

}  // namespace

std::optional<LdmSidecar> read_ldm_sidecar(const fs::path& file) {
  fs::path path = file;
  path.replace_extension(".yaml");
  if (!fs::is_regular_file(path)) return std::nullopt;
  YAML::Node root;
  try {
    root = YAML::LoadFile(path.string());
  } catch (const YAML::Exception& error) {
    throw ModelError(path.string() + ": not a YAML file (" + error.msg +
                     "); it is read as the model's LDM config: fix or remove it");
  }
  LdmSidecar sidecar;
  sidecar.path = path;
  const YAML::Node params = child(root, {"model", "params"});
  if (auto p =
          scalar<std::string>(params["parameterization"], path, "model.params.parameterization")) {
    if (*p != "v" && *p != "eps")
      throw ModelError(path.string() + ": model.params.parameterization is \"" + *p +
                       "\"; sdtrain trains \"eps\" and \"v\" models");
    sidecar.prediction_type = *p == "v" ? "v_prediction" : "epsilon";
  }
  sidecar.scale_factor = scalar<double>(params["scale_factor"], path, "model.params.scale_factor");
  const YAML::Node unet = child(params, {"unet_config", "params"});
  // LDM writes -1 for the one of the two it does not use.
  auto positive = [](std::optional<int64_t> v) { return v && *v > 0 ? v : std::nullopt; };
  sidecar.num_heads = positive(scalar<int64_t>(unet["num_heads"], path, "num_heads"));
  sidecar.num_head_channels =
      positive(scalar<int64_t>(unet["num_head_channels"], path, "num_head_channels"));
  return sidecar;
}

std::string ldm_sidecar_text(const nlohmann::json& unet, const nlohmann::json& vae,
                             const std::string& prediction_type, bool open_clip) {
  auto list = [](const std::vector<int64_t>& values) {
    std::string out = "[";
    for (std::size_t i = 0; i < values.size(); ++i)
      out += (i ? ", " : "") + std::to_string(values[i]);
    return out + "]";
  };
  auto multiples = [&](const std::vector<int64_t>& channels) {
    std::vector<int64_t> m;
    for (int64_t c : channels) m.push_back(c / channels.front());
    return list(m);
  };
  const auto channels = unet["block_out_channels"].get<std::vector<int64_t>>();
  const auto down = unet["down_block_types"].get<std::vector<std::string>>();
  std::vector<int64_t> attention_resolutions;  // the downsampling factors of attention blocks
  for (std::size_t i = 0; i < down.size(); ++i)
    if (down[i] == "CrossAttnDownBlock2D") attention_resolutions.push_back(int64_t{1} << i);
  const auto vae_channels = vae["block_out_channels"].get<std::vector<int64_t>>();
  const bool head_list = unet["attention_head_dim"].is_array();
  const int64_t heads = head_list ? unet["attention_head_dim"][0].get<int64_t>()
                                  : unet["attention_head_dim"].get<int64_t>();
  std::ostringstream y;
  y << "# The LDM inference config of this model (written by sdtrain): AUTOMATIC1111 reads it\n"
       "# beside the .safetensors file of the same name.\n"
       "model:\n"
       "  target: ldm.models.diffusion.ddpm.LatentDiffusion\n"
       "  params:\n"
    << "    parameterization: \"" << (prediction_type == "v_prediction" ? "v" : "eps") << "\"\n"
    << "    linear_start: 0.00085\n    linear_end: 0.0120\n    timesteps: 1000\n"
       "    num_timesteps_cond: 1\n    first_stage_key: \"jpg\"\n    cond_stage_key: \"txt\"\n"
    << "    image_size: " << unet.value("sample_size", int64_t{64}) << "\n"
    << "    channels: " << unet.value("in_channels", int64_t{4}) << "\n"
    << "    cond_stage_trainable: false\n    conditioning_key: crossattn\n"
    << "    scale_factor: " << vae.value("scaling_factor", 0.18215) << "\n    use_ema: false\n"
    << "    unet_config:\n      target: ldm.modules.diffusionmodules.openaimodel.UNetModel\n"
       "      params:\n        use_fp16: true\n        image_size: 32\n"
    << "        in_channels: " << unet.value("in_channels", int64_t{4}) << "\n"
    << "        out_channels: " << unet.value("out_channels", int64_t{4}) << "\n"
    << "        model_channels: " << channels.front() << "\n"
    << "        attention_resolutions: " << list(attention_resolutions) << "\n"
    << "        num_res_blocks: " << unet.value("layers_per_block", int64_t{2}) << "\n"
    << "        channel_mult: " << multiples(channels) << "\n"
    << (head_list ? "        num_head_channels: " + std::to_string(channels.front() / heads)
                  : "        num_heads: " + std::to_string(heads))
    << "\n        use_spatial_transformer: true\n"
    << "        use_linear_in_transformer: "
    << (unet.value("use_linear_projection", false) ? "true" : "false")
    << "\n        transformer_depth: 1\n"
    << "        context_dim: " << unet.value("cross_attention_dim", int64_t{768})
    << "\n        legacy: false\n"
    << "    first_stage_config:\n      target: ldm.models.autoencoder.AutoencoderKL\n      "
       "params:\n"
    << "        embed_dim: " << vae.value("latent_channels", int64_t{4}) << "\n"
    << "        monitor: val/rec_loss\n        ddconfig:\n          double_z: true\n"
    << "          z_channels: " << vae.value("latent_channels", int64_t{4}) << "\n"
    << "          resolution: 256\n          in_channels: 3\n          out_ch: 3\n"
    << "          ch: " << vae_channels.front() << "\n"
    << "          ch_mult: " << multiples(vae_channels) << "\n"
    << "          num_res_blocks: " << vae.value("layers_per_block", int64_t{1}) << "\n"
    << "          attn_resolutions: []\n          dropout: 0.0\n"
       "        lossconfig:\n          target: torch.nn.Identity\n"
       "    cond_stage_config:\n";
  y << (open_clip ? "      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder\n"
                    "      params:\n        freeze: true\n        layer: \"penultimate\"\n"
                  : "      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n");
  return y.str();
}

}  // namespace sdtrain::models
