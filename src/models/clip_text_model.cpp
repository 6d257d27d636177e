#include "sdtrain/models/clip_text_model.h"

#include <algorithm>

#include "config_reader.h"
#include "sdtrain/models/attention_backend.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/gradient_checkpointing.h"
#include "sdtrain/models/uninitialised.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::models {
namespace {

CLIPActivation parse_activation(detail::ConfigReader& config) {
  const std::string act = config.string("hidden_act", "quick_gelu");  // transformers' default
  if (act == "gelu") return CLIPActivation::gelu;
  if (act == "quick_gelu") return CLIPActivation::quick_gelu;
  config.fail("hidden_act", act, "supported: \"gelu\" as in SD 2.x, \"quick_gelu\" as in SD 1.x");
}

}  // namespace

std::string to_string(CLIPActivation activation) {
  return activation == CLIPActivation::gelu ? "gelu" : "quick_gelu";
}

CLIPTextConfig CLIPTextConfig::from_json(const nlohmann::json& json, const std::string& source) {
  detail::ConfigReader reader(json, source);
  // A full CLIPConfig ("clip", with text_config/vision_config) or a projection model would load
  // as something else; say so instead of failing later on tensor names.
  if (const auto* type = reader.find("model_type"); type && *type != "clip_text_model") {
    reader.fail("model_type", *type, "expected \"clip_text_model\"");
  }
  if (const auto* architectures = reader.find("architectures")) {
    bool text_model = architectures->is_array() &&
                      std::any_of(architectures->begin(), architectures->end(),
                                  [](const auto& a) { return a == "CLIPTextModel"; });
    if (!text_model) reader.fail("architectures", *architectures, "expected [\"CLIPTextModel\"]");
  }

  CLIPTextConfig config;
  auto at_least_one = [&](const char* key, int64_t fallback) {
    int64_t value = reader.integer(key, fallback);
    if (value < 1) reader.fail(key, value, "must be at least 1");
    return value;
  };
  config.vocab_size = at_least_one("vocab_size", config.vocab_size);
  config.hidden_size = at_least_one("hidden_size", config.hidden_size);
  config.intermediate_size = at_least_one("intermediate_size", config.intermediate_size);
  config.num_hidden_layers = at_least_one("num_hidden_layers", config.num_hidden_layers);
  config.num_attention_heads = at_least_one("num_attention_heads", config.num_attention_heads);
  config.max_position_embeddings = at_least_one("max_position_embeddings", config.max_position_embeddings);
  config.hidden_act = parse_activation(reader);
  config.layer_norm_eps = reader.number("layer_norm_eps", config.layer_norm_eps);
  if (!(config.layer_norm_eps > 0.0)) reader.fail("layer_norm_eps", config.layer_norm_eps, "must be positive");
  if (config.hidden_size % config.num_attention_heads != 0) {
    reader.fail("num_attention_heads", config.num_attention_heads,
                "\"hidden_size\" = " + std::to_string(config.hidden_size) + " is not divisible by it");
  }
  // Dropout is only active in training; SD text encoders ship 0.0 and train without it.
  reader.require_value("attention_dropout", 0.0, "only 0.0, as in every SD text encoder");
  return config;
}

CLIPTextConfig CLIPTextConfig::from_file(const std::filesystem::path& path) {
  return from_json(read_json_file(path, ExitCode::model), path.string());
}

CLIPTextEmbeddingsImpl::CLIPTextEmbeddingsImpl(const CLIPTextConfig& config) {
  token_embedding = register_module(
      "token_embedding", torch::nn::Embedding(config.vocab_size, config.hidden_size));
  position_embedding = register_module(
      "position_embedding", torch::nn::Embedding(config.max_position_embeddings, config.hidden_size));
}

torch::Tensor CLIPTextEmbeddingsImpl::forward(const torch::Tensor& input_ids) {
  auto positions = torch::arange(input_ids.size(1), input_ids.options().dtype(torch::kLong));  // [L]
  // [B, L, D] + [L, D]
  return token_embedding(input_ids) + position_embedding(positions);
}

CLIPAttentionImpl::CLIPAttentionImpl(const CLIPTextConfig& config)
    : num_heads_(config.num_attention_heads), head_dim_(config.head_dim()) {
  const int64_t d = config.hidden_size;
  // Registration order follows the reference (k, v, q, out) so parameters() iterates alike.
  k_proj = register_module("k_proj", LoRALinear(torch::nn::LinearOptions(d, d)));
  v_proj = register_module("v_proj", LoRALinear(torch::nn::LinearOptions(d, d)));
  q_proj = register_module("q_proj", LoRALinear(torch::nn::LinearOptions(d, d)));
  out_proj = register_module("out_proj", LoRALinear(torch::nn::LinearOptions(d, d)));
}

torch::Tensor CLIPAttentionImpl::forward(const torch::Tensor& hidden_states) {
  const int64_t batch = hidden_states.size(0), length = hidden_states.size(1);
  auto heads = [&](const torch::Tensor& projected) {  // [B, L, D] -> [B, H, L, Dh]
    return projected.view({batch, length, num_heads_, head_dim_}).transpose(1, 2);
  };
  // softmax(q k^T / sqrt(Dh) + causal) v. The default scale of SDPA is Dh^-0.5, the
  // reference's self.scale; the reference's eager path adds a dtype-min upper triangle, which
  // is_causal reproduces (exp underflows to exactly 0 either way).
  auto attended =
      attention_kernel(heads(q_proj(hidden_states)), heads(k_proj(hidden_states)),
                       heads(v_proj(hidden_states)), /*is_causal=*/true);  // [B, H, L, Dh]
  return out_proj(attended.transpose(1, 2).reshape({batch, length, num_heads_ * head_dim_}));
}

CLIPMLPImpl::CLIPMLPImpl(const CLIPTextConfig& config) : activation_(config.hidden_act) {
  fc1 = register_module("fc1", LoRALinear(torch::nn::LinearOptions(config.hidden_size, config.intermediate_size)));
  fc2 = register_module("fc2", LoRALinear(torch::nn::LinearOptions(config.intermediate_size, config.hidden_size)));
}

torch::Tensor CLIPMLPImpl::forward(const torch::Tensor& hidden_states) {
  auto h = fc1(hidden_states);  // [B, L, I]
  if (activation_ == CLIPActivation::gelu) {
    h = torch::gelu(h);  // exact erf form, transformers' "gelu"
  } else {
    h = h * torch::sigmoid(1.702 * h);  // OpenAI CLIP's QuickGELU
  }
  return fc2(h);
}

CLIPEncoderLayerImpl::CLIPEncoderLayerImpl(const CLIPTextConfig& config) {
  auto norm = torch::nn::LayerNormOptions({config.hidden_size}).eps(config.layer_norm_eps);
  self_attn = register_module("self_attn", CLIPAttention(config));
  layer_norm1 = register_module("layer_norm1", torch::nn::LayerNorm(norm));
  mlp = register_module("mlp", CLIPMLP(config));
  layer_norm2 = register_module("layer_norm2", torch::nn::LayerNorm(norm));
}

torch::Tensor CLIPEncoderLayerImpl::forward(const torch::Tensor& hidden_states) {
  auto h = hidden_states + self_attn(layer_norm1(hidden_states));
  return h + mlp(layer_norm2(h));
}

CLIPEncoderImpl::CLIPEncoderImpl(const CLIPTextConfig& config) {
  auto list = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < config.num_hidden_layers; ++i) {
    layers.emplace_back(config);
    list->push_back(layers.back());
  }
}

torch::Tensor CLIPEncoderImpl::forward(const torch::Tensor& hidden_states, std::optional<int64_t> num_layers) {
  const int64_t count = num_layers.value_or(static_cast<int64_t>(layers.size()));
  TORCH_CHECK(count >= 0 && count <= static_cast<int64_t>(layers.size()), "CLIPEncoder: cannot run ", count,
              " of ", layers.size(), " layers");
  auto h = hidden_states;  // [B, L, D]
  const bool recompute = gradient_checkpointing && torch::GradMode::is_enabled();
  for (int64_t i = 0; i < count; ++i) {
    if (recompute) {
      std::shared_ptr<CLIPEncoderLayerImpl> layer = layers[i].ptr();
      h = checkpoint([layer](const std::vector<torch::Tensor>& in) { return layer->forward(in[0]); }, {h}, *layer);
    } else {
      h = layers[i]->forward(h);
    }
  }
  return h;
}

CLIPTextTransformerImpl::CLIPTextTransformerImpl(const CLIPTextConfig& config)
    : num_layers_(config.num_hidden_layers), max_positions_(config.max_position_embeddings) {
  embeddings = register_module("embeddings", CLIPTextEmbeddings(config));
  encoder = register_module("encoder", CLIPEncoder(config));
  final_layer_norm = register_module(
      "final_layer_norm",
      torch::nn::LayerNorm(torch::nn::LayerNormOptions({config.hidden_size}).eps(config.layer_norm_eps)));
}

torch::Tensor CLIPTextTransformerImpl::forward(const torch::Tensor& input_ids, int64_t clip_skip) {
  TORCH_CHECK(input_ids.dim() == 2, "CLIPTextModel: input_ids must be [batch, length], got ", input_ids.sizes());
  TORCH_CHECK(input_ids.scalar_type() == torch::kLong || input_ids.scalar_type() == torch::kInt,
              "CLIPTextModel: input_ids must be an integer tensor, got ", input_ids.scalar_type());
  TORCH_CHECK(input_ids.size(1) <= max_positions_, "CLIPTextModel: sequence length ", input_ids.size(1),
              " exceeds max_position_embeddings ", max_positions_);
  if (clip_skip < 0 || clip_skip > num_layers_) {
    throw ConfigError("clip_skip = " + std::to_string(clip_skip) + " is out of range: the text encoder has " +
                      std::to_string(num_layers_) + " layers (allowed 0.." + std::to_string(num_layers_) + ")");
  }
  auto h = encoder(embeddings(input_ids), num_layers_ - clip_skip);  // [B, L, D]
  return final_layer_norm(h);
}

CLIPTextModelImpl::CLIPTextModelImpl(const CLIPTextConfig& config) : config_(config) {
  text_model = register_module("text_model", CLIPTextTransformer(config));
}

torch::Tensor CLIPTextModelImpl::forward(const torch::Tensor& input_ids, int64_t clip_skip) {
  return text_model(input_ids, clip_skip);
}

void CLIPTextModelImpl::set_gradient_checkpointing(bool enabled) {
  text_model->encoder->gradient_checkpointing = enabled;
}

std::optional<std::string> map_text_encoder_key(const std::string& checkpoint_key) {
  static const std::string prefix = "text_model.";
  std::string key = checkpoint_key.starts_with(prefix) ? checkpoint_key : prefix + checkpoint_key;
  if (key == "text_model.embeddings.position_ids") return std::nullopt;
  return key;
}

CLIPTextModel load_text_encoder(const io::ModelFolder& folder, const LoadOptions& options,
                                const std::string& variant) {
  const io::Component& component = folder.require("text_encoder");
  if (component.class_name != "CLIPTextModel") {
    throw ModelError((folder.root() / "model_index.json").string() + ": text_encoder is " + component.library +
                     "/" + component.class_name + "; only transformers/CLIPTextModel is supported");
  }
  auto config = CLIPTextConfig::from_json(folder.config("text_encoder"), folder.config_path("text_encoder").string());
  auto model = build_uninitialised([&] { return CLIPTextModel(config); });
  load_component_weights(*model, folder, "text_encoder", options, variant, map_text_encoder_key);
  return model;
}

}  // namespace sdtrain::models
