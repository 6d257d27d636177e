#include "sdtrain/models/ldm_keys.h"

#include <charconv>
#include <map>
#include <stdexcept>

namespace sdtrain::models {
namespace {

std::vector<std::string> split(const std::string& key) {
  std::vector<std::string> parts;
  std::size_t start = 0;
  for (std::size_t dot = key.find('.'); dot != std::string::npos; dot = key.find('.', start)) {
    parts.push_back(key.substr(start, dot - start));
    start = dot + 1;
  }
  parts.push_back(key.substr(start));
  return parts;
}

std::string join(const std::vector<std::string>& parts, std::size_t from) {
  std::string joined;
  for (std::size_t i = from; i < parts.size(); ++i)
    joined += (joined.empty() ? "" : ".") + parts[i];
  return joined;
}

[[noreturn]] void unknown(const std::string& key, const std::string& what) {
  throw std::invalid_argument("\"" + key + "\" is not a key of an SD 1.x/2.x " + what);
}

int64_t index_at(const std::vector<std::string>& parts, std::size_t at, const std::string& key,
                 const std::string& what) {
  int64_t value = -1;
  if (at >= parts.size()) unknown(key, what);
  const std::string& text = parts[at];
  auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
  if (error != std::errc() || end != text.data() + text.size() || value < 0) unknown(key, what);
  return value;
}

// The first component of a key inside a block, renamed by `names` when it is there.
std::string rename_first(const std::vector<std::string>& parts, std::size_t from,
                         const std::map<std::string, std::string>& names) {
  std::vector<std::string> rest(parts.begin() + static_cast<std::ptrdiff_t>(from), parts.end());
  if (!rest.empty()) {
    // Names of two components ("to_out.0") are matched before names of one.
    if (rest.size() > 1) {
      auto two = names.find(rest[0] + "." + rest[1]);
      if (two != names.end()) {
        rest.erase(rest.begin());
        rest[0] = two->second;
        return join(rest, 0);
      }
    }
    auto one = names.find(rest[0]);
    if (one != names.end()) rest[0] = one->second;
  }
  return join(rest, 0);
}

// ResnetBlock2D in the UNet: LDM's ResBlock sequences.
const std::map<std::string, std::string>& unet_resnet_names() {
  static const std::map<std::string, std::string> names = {
      {"norm1", "in_layers.0"},  {"conv1", "in_layers.2"},  {"time_emb_proj", "emb_layers.1"},
      {"norm2", "out_layers.0"}, {"conv2", "out_layers.3"}, {"conv_shortcut", "skip_connection"}};
  return names;
}

std::string unet_block(const std::vector<std::string>& parts, const std::string& key,
                       const LdmUNetLayout& layout) {
  const int64_t L = layout.layers_per_block;
  const std::string what = "UNet";
  const std::string& side = parts[0];
  const int64_t i = index_at(parts, 1, key, what);
  const std::string kind = parts.size() > 2 ? parts[2] : "";
  const bool down = side == "down_blocks";
  const int64_t first = down ? 1 + i * (L + 1) : i * (L + 1);
  const std::string blocks = down ? "input_blocks." : "output_blocks.";
  if (kind == "resnets" || kind == "attentions") {
    const int64_t j = index_at(parts, 3, key, what);
    if (j > (down ? L - 1 : L)) unknown(key, what);
    const std::string inner =
        kind == "resnets" ? rename_first(parts, 4, unet_resnet_names()) : join(parts, 4);
    return blocks + std::to_string(first + j) + (kind == "resnets" ? ".0." : ".1.") + inner;
  }
  if ((kind == "downsamplers" || kind == "upsamplers") && parts.size() > 5 && parts[3] == "0" &&
      parts[4] == "conv") {
    if (down) return blocks + std::to_string(first + L) + ".0.op." + join(parts, 5);
    if (i >= static_cast<int64_t>(layout.up_block_has_attention.size())) unknown(key, what);
    const char* slot = layout.up_block_has_attention[i] ? ".2.conv." : ".1.conv.";
    return blocks + std::to_string(first + L) + slot + join(parts, 5);
  }
  unknown(key, what);
}

}  // namespace

std::string ldm_unet_key(const std::string& key, const LdmUNetLayout& layout) {
  static const std::map<std::string, std::string> top = {
      {"conv_in", "input_blocks.0.0"},
      {"time_embedding.linear_1", "time_embed.0"},
      {"time_embedding.linear_2", "time_embed.2"},
      {"conv_norm_out", "out.0"},
      {"conv_out", "out.2"}};
  const std::string prefix = "model.diffusion_model.";
  const std::vector<std::string> parts = split(key);
  if (parts.size() < 2) unknown(key, "UNet");
  if (parts[0] == "down_blocks" || parts[0] == "up_blocks")
    return prefix + unet_block(parts, key, layout);
  if (parts[0] == "mid_block" && parts.size() > 3) {
    const int64_t j = index_at(parts, 2, key, "UNet");
    if (parts[1] == "resnets" && j <= 1)
      return prefix + "middle_block." + (j == 0 ? "0." : "2.") +
             rename_first(parts, 3, unet_resnet_names());
    if (parts[1] == "attentions" && j == 0) return prefix + "middle_block.1." + join(parts, 3);
    unknown(key, "UNet");
  }
  for (const auto& [name, ldm] : top) {
    if (key.starts_with(name + ".") && split(name).size() == parts.size() - 1)
      return prefix + ldm + key.substr(name.size());
  }
  unknown(key, "UNet");
}

std::string ldm_vae_key(const std::string& key, int64_t num_up_blocks) {
  static const std::map<std::string, std::string> resnet = {{"conv_shortcut", "nin_shortcut"}};
  static const std::map<std::string, std::string> attention = {{"group_norm", "norm"},
                                                               {"to_q", "q"},
                                                               {"to_k", "k"},
                                                               {"to_v", "v"},
                                                               {"to_out.0", "proj_out"}};
  static const std::map<std::string, std::string> ends = {
      {"conv_norm_out", "norm_out"}, {"conv_in", "conv_in"}, {"conv_out", "conv_out"}};
  const std::string prefix = "first_stage_model.";
  const std::vector<std::string> parts = split(key);
  const std::string what = "VAE";
  if (parts.size() == 2 && (parts[0] == "quant_conv" || parts[0] == "post_quant_conv"))
    return prefix + key;
  if (parts.size() < 3 || (parts[0] != "encoder" && parts[0] != "decoder")) unknown(key, what);
  const std::string side = parts[0] + ".";
  if (parts.size() == 3 && ends.count(parts[1]))
    return prefix + side + ends.at(parts[1]) + "." + parts[2];
  if (parts[1] == "mid_block" && parts.size() > 4) {
    const int64_t j = index_at(parts, 3, key, what);
    if (parts[2] == "resnets" && j <= 1)
      return prefix + side + "mid.block_" + std::to_string(j + 1) + "." +
             rename_first(parts, 4, resnet);
    if (parts[2] == "attentions" && j == 0)
      return prefix + side + "mid.attn_1." + rename_first(parts, 4, attention);
    unknown(key, what);
  }
  const bool down = parts[1] == "down_blocks" && parts[0] == "encoder";
  const bool up = parts[1] == "up_blocks" && parts[0] == "decoder";
  if (!down && !up) unknown(key, what);
  int64_t i = index_at(parts, 2, key, what);
  if (up) {
    if (i >= num_up_blocks) unknown(key, what);
    i = num_up_blocks - 1 - i;  // LDM counts the decoder's blocks from the lowest resolution
  }
  const std::string block = prefix + side + (down ? "down." : "up.") + std::to_string(i) + ".";
  if (parts.size() > 5 && parts[3] == "resnets")
    return block + "block." + std::to_string(index_at(parts, 4, key, what)) + "." +
           rename_first(parts, 5, resnet);
  if (parts.size() > 6 && (parts[3] == "downsamplers" || parts[3] == "upsamplers") &&
      parts[4] == "0" && parts[5] == "conv")
    return block + (down ? "downsample.conv." : "upsample.conv.") + join(parts, 6);
  unknown(key, what);
}

LdmKey ldm_text_encoder_key(const std::string& key, LdmTextEncoder family) {
  const std::string what = "text encoder";
  if (!key.starts_with("text_model.")) unknown(key, what);
  if (family == LdmTextEncoder::clip_vit_l) return {"cond_stage_model.transformer." + key};
  static const std::map<std::string, std::string> fixed = {
      {"text_model.embeddings.position_embedding.weight", "positional_embedding"},
      {"text_model.embeddings.token_embedding.weight", "token_embedding.weight"},
      {"text_model.final_layer_norm.weight", "ln_final.weight"},
      {"text_model.final_layer_norm.bias", "ln_final.bias"}};
  static const std::map<std::string, std::string> layer = {{"layer_norm1", "ln_1"},
                                                           {"layer_norm2", "ln_2"},
                                                           {"mlp.fc1", "mlp.c_fc"},
                                                           {"mlp.fc2", "mlp.c_proj"},
                                                           {"self_attn.out_proj", "attn.out_proj"}};
  const std::string prefix = "cond_stage_model.model.";
  if (fixed.count(key)) return {prefix + fixed.at(key)};
  const std::vector<std::string> parts = split(key);
  if (parts.size() < 6 || parts[1] != "encoder" || parts[2] != "layers") unknown(key, what);
  const std::string block =
      prefix + "transformer.resblocks." + std::to_string(index_at(parts, 3, key, what)) + ".";
  const std::string inner = join(parts, 4);
  const std::string& last = parts.back();
  for (const auto& [third, name] :
       {std::pair{0, "self_attn.q_proj."}, std::pair{1, "self_attn.k_proj."},
        std::pair{2, "self_attn.v_proj."}}) {
    if (inner == std::string(name) + last && (last == "weight" || last == "bias"))
      return {block + "attn.in_proj_" + last, third};
  }
  const std::string renamed = rename_first(parts, 4, layer);
  if (renamed == inner) unknown(key, what);  // every layer weight is renamed
  return {block + renamed};
}

}  // namespace sdtrain::models
