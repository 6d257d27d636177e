#include "sdtrain/models/single_file.h"

#include <algorithm>
#include <functional>
#include <stdexcept>

#include "sdtrain/models/describe.h"
#include "sdtrain/util/error.h"

namespace sdtrain::models {
namespace {

// The single-file name of one diffusers tensor of `component`.
LdmKey ldm_key(const std::string& component, const std::string& key,
               const SingleFileLayout& layout) {
  if (component == "unet") return {ldm_unet_key(key, layout.unet)};
  if (component == "vae") return {ldm_vae_key(key, layout.vae_up_blocks)};
  if (component == "text_encoder") return ldm_text_encoder_key(key, layout.text_encoder);
  throw std::invalid_argument("no single-file layout for component \"" + component + "\"");
}

// diffusers' VAE attention projections are Linear [C, C]; LDM's are 1x1 convolutions.
bool is_vae_attention_weight(const std::string& component, const std::string& key) {
  if (component != "vae" || key.find(".mid_block.attentions.") == std::string::npos) return false;
  return key.ends_with("to_q.weight") || key.ends_with("to_k.weight") ||
         key.ends_with("to_v.weight") || key.ends_with("to_out.0.weight");
}

}  // namespace

SingleFileLayout single_file_layout(const UNet2DConditionConfig& unet,
                                    const AutoencoderKLConfig& vae,
                                    const CLIPTextConfig& text_encoder) {
  const auto& layers = unet.layers_per_block;
  if (layers.empty() ||
      std::adjacent_find(layers.begin(), layers.end(), std::not_equal_to<>()) != layers.end())
    throw std::invalid_argument(
        "a single file needs the same layers_per_block in every UNet block");
  SingleFileLayout layout;
  layout.unet.layers_per_block = layers.front();
  // diffusers' up blocks run from the lowest resolution; each up block's type says whether it
  // holds attentions.
  for (const auto& type : unet.up_block_types)
    layout.unet.up_block_has_attention.push_back(type != "UpBlock2D");
  layout.vae_up_blocks = static_cast<int64_t>(vae.block_out_channels.size());
  layout.text_encoder = text_encoder.hidden_act == CLIPActivation::gelu
                            ? LdmTextEncoder::open_clip
                            : LdmTextEncoder::clip_vit_l;
  return layout;
}

io::NamedTensors to_single_file(const std::map<std::string, io::NamedTensors>& components,
                                const SingleFileLayout& layout) {
  io::NamedTensors out;
  std::map<std::string, std::vector<torch::Tensor>> fused;  // in_proj key -> q, k, v
  std::vector<std::string> fused_order;
  for (const auto& [component, tensors] : components) {
    for (const auto& [key, tensor] : tensors) {
      const LdmKey target = ldm_key(component, key, layout);
      if (target.rows_third >= 0) {
        auto& parts = fused[target.key];
        if (parts.empty()) {
          parts.resize(3);
          fused_order.push_back(target.key);
        }
        parts[target.rows_third] = tensor;
        continue;
      }
      const bool conv = is_vae_attention_weight(component, key);
      out.emplace_back(target.key,
                       conv ? tensor.reshape({tensor.size(0), tensor.size(1), 1, 1}) : tensor);
    }
  }
  for (const auto& key : fused_order) {
    const auto& parts = fused.at(key);
    if (!parts[0].defined() || !parts[1].defined() || !parts[2].defined())
      throw std::invalid_argument(key + ": the text encoder lacks one of q, k, v");
    out.emplace_back(key, torch::cat(parts, 0));
  }
  return out;
}

std::string ldm_ema_key(const std::string& ldm_unet_key) {
  std::string flat = "model_ema.";
  for (char c : ldm_unet_key.substr(ldm_unet_key.find('.') + 1))
    if (c != '.') flat += c;
  return flat;
}

io::NamedTensors from_single_file(const io::SafetensorsFile& file, const std::string& component,
                                  const io::NamedTensors& expected, const SingleFileLayout& layout,
                                  bool ema) {
  io::NamedTensors out;
  std::vector<std::string> problems;
  for (const auto& [key, like] : expected) {
    LdmKey source = ldm_key(component, key, layout);
    if (ema && component == "unet") source.key = ldm_ema_key(source.key);
    const io::TensorEntry* entry = file.find(source.key);
    if (!entry) {
      problems.push_back(source.key + " (for " + component + "." + key + ") is missing");
      continue;
    }
    torch::Tensor tensor = file.tensor(source.key);
    if (source.rows_third >= 0 && tensor.size(0) % 3 == 0) {
      const int64_t rows = tensor.size(0) / 3;
      tensor = tensor.narrow(0, source.rows_third * rows, rows);
    }
    if (is_vae_attention_weight(component, key) && tensor.dim() == 4) tensor = tensor.flatten(1);
    if (tensor.sizes() != like.sizes()) {
      problems.push_back(source.key + " is " + describe_shape(tensor.sizes()) + ", " + component +
                         "." + key + " needs " + describe_shape(like.sizes()));
      continue;
    }
    out.emplace_back(key, tensor);
  }
  if (!problems.empty()) {
    throw ModelError(file.path().string() + ": " + component + " weights do not fit" +
                     list_block("mismatches", problems, 5) +
                     "\nIs it a Stable Diffusion 1.x/2.x single file of this architecture?");
  }
  return out;
}

}  // namespace sdtrain::models
