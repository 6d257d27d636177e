#pragma once
// CLIPTextModel: the text encoder of Stable Diffusion 1.x/2.x (transformers
// models/clip/modeling_clip.py; docs/models.md). The module tree mirrors the
// checkpoint layout on the Hub, `text_model.{embeddings,encoder.layers.N,final_layer_norm}`,
// so named_parameters() yields the checkpoint keys with no mapping. (transformers >= 5 dropped
// the `text_model.` level from its own module tree and writes files without the prefix; the
// loader accepts both spellings, see map_text_encoder_key.)

#include <torch/torch.h>

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/lora.h"
#include "sdtrain/models/state_dict.h"

namespace sdtrain::models {

enum class CLIPActivation {
  gelu,        // exact (erf) GELU: SD 2.x (OpenCLIP ViT-H)
  quick_gelu,  // x * sigmoid(1.702 x): SD 1.x (OpenAI ViT-L/14)
};

// The architecture fields of text_encoder/config.json. Absent keys take transformers'
// CLIPTextConfig defaults (so a config without hidden_act means quick_gelu, as it does there).
// Keys that do not change the forward pass (bos/eos/pad ids, projection_dim, initializer_*,
// torch_dtype) are not read.
struct CLIPTextConfig {
  int64_t vocab_size = 49408;
  int64_t hidden_size = 512;
  int64_t intermediate_size = 2048;
  int64_t num_hidden_layers = 12;
  int64_t num_attention_heads = 8;
  int64_t max_position_embeddings = 77;
  CLIPActivation hidden_act = CLIPActivation::quick_gelu;
  double layer_norm_eps = 1e-5;

  // Parses and validates; `source` (the file) prefixes every error. A wrong type, a value out
  // of range or an unsupported feature (another hidden_act, nonzero attention_dropout, a
  // CLIPTextModelWithProjection config) is a ModelError naming the key and the value.
  static CLIPTextConfig from_json(const nlohmann::json& json, const std::string& source);
  static CLIPTextConfig from_file(const std::filesystem::path& path);

  int64_t head_dim() const { return hidden_size / num_attention_heads; }
};

std::string to_string(CLIPActivation activation);

// text_model.embeddings: token embedding plus a learned absolute position embedding. The
// reference's position_ids buffer (arange, non-persistent) is not kept: positions are
// recomputed per call, and the legacy copy some files hold is dropped on load.
class CLIPTextEmbeddingsImpl : public torch::nn::Module {
 public:
  explicit CLIPTextEmbeddingsImpl(const CLIPTextConfig& config);
  torch::Tensor forward(const torch::Tensor& input_ids);  // [B, L] int64 -> [B, L, D]

  torch::nn::Embedding token_embedding{nullptr};
  torch::nn::Embedding position_embedding{nullptr};
};
TORCH_MODULE(CLIPTextEmbeddings);

// Causal multi-head self-attention. SD never passes a padding mask (docs/models.md), so the
// causal mask is the only one and attention goes through scaled_dot_product_attention with
// is_causal, which picks the fused kernels on CUDA.
class CLIPAttentionImpl : public torch::nn::Module {
 public:
  explicit CLIPAttentionImpl(const CLIPTextConfig& config);
  torch::Tensor forward(const torch::Tensor& hidden_states);  // [B, L, D] -> [B, L, D]

  // The projections can carry LoRA adapters (lora.h), the text-encoder targets of diffusers.
  LoRALinear q_proj{nullptr};
  LoRALinear k_proj{nullptr};
  LoRALinear v_proj{nullptr};
  LoRALinear out_proj{nullptr};

 private:
  int64_t num_heads_;
  int64_t head_dim_;
};
TORCH_MODULE(CLIPAttention);

class CLIPMLPImpl : public torch::nn::Module {
 public:
  explicit CLIPMLPImpl(const CLIPTextConfig& config);
  torch::Tensor forward(const torch::Tensor& hidden_states);  // [B, L, D] -> [B, L, D]

  LoRALinear fc1{nullptr};
  LoRALinear fc2{nullptr};

 private:
  CLIPActivation activation_;
};
TORCH_MODULE(CLIPMLP);

// Pre-LayerNorm transformer block: h += attn(ln1(h)); h += mlp(ln2(h)).
class CLIPEncoderLayerImpl : public torch::nn::Module {
 public:
  explicit CLIPEncoderLayerImpl(const CLIPTextConfig& config);
  torch::Tensor forward(const torch::Tensor& hidden_states);  // [B, L, D] -> [B, L, D]

  CLIPAttention self_attn{nullptr};
  torch::nn::LayerNorm layer_norm1{nullptr};
  CLIPMLP mlp{nullptr};
  torch::nn::LayerNorm layer_norm2{nullptr};
};
TORCH_MODULE(CLIPEncoderLayer);

class CLIPEncoderImpl : public torch::nn::Module {
 public:
  explicit CLIPEncoderImpl(const CLIPTextConfig& config);
  // Runs the first `num_layers` layers (all of them by default).
  torch::Tensor forward(const torch::Tensor& hidden_states, std::optional<int64_t> num_layers = std::nullopt);

  // Registered as the ModuleList "layers" (keys encoder.layers.N.*); typed handles kept here.
  std::vector<CLIPEncoderLayer> layers;
  // Recompute each layer in backward instead of keeping its activations (transformers'
  // gradient_checkpointing_enable() does this per encoder layer too); only while grad is on.
  bool gradient_checkpointing = false;
};
TORCH_MODULE(CLIPEncoder);

// What transformers 4 called CLIPTextTransformer: the `text_model.` level of the checkpoint.
class CLIPTextTransformerImpl : public torch::nn::Module {
 public:
  explicit CLIPTextTransformerImpl(const CLIPTextConfig& config);
  torch::Tensor forward(const torch::Tensor& input_ids, int64_t clip_skip = 0);

  CLIPTextEmbeddings embeddings{nullptr};
  CLIPEncoder encoder{nullptr};
  torch::nn::LayerNorm final_layer_norm{nullptr};

 private:
  int64_t num_layers_;
  int64_t max_positions_;
};
TORCH_MODULE(CLIPTextTransformer);

class CLIPTextModelImpl : public torch::nn::Module {
 public:
  explicit CLIPTextModelImpl(const CLIPTextConfig& config);

  // input_ids [B, L] int64, L <= max_position_embeddings -> [B, L, D].
  // clip_skip = 0 gives last_hidden_state (final_layer_norm of the last layer's output), what
  // `text_encoder(ids)[0]` returns. clip_skip = k > 0 gives what the SD pipelines compute for
  // `clip_skip=k`: final_layer_norm(hidden_states[-(k+1)]), i.e. the output of the first
  // num_hidden_layers - k layers, normalised (k = num_hidden_layers: the embeddings).
  torch::Tensor forward(const torch::Tensor& input_ids, int64_t clip_skip = 0);

  // For train_text_encoder with gradient_checkpointing (see CLIPEncoderImpl).
  void set_gradient_checkpointing(bool enabled);

  const CLIPTextConfig& config() const { return config_; }

  CLIPTextTransformer text_model{nullptr};

 private:
  CLIPTextConfig config_;
};
TORCH_MODULE(CLIPTextModel);

// Checkpoint key -> module key for text encoder weights: drops the legacy
// `text_model.embeddings.position_ids` buffer (persistent in transformers < 4.31, so old files
// and converted checkpoints carry it) and adds the `text_model.` prefix that transformers >= 5
// leaves out when it saves.
std::optional<std::string> map_text_encoder_key(const std::string& checkpoint_key);

// Builds the model from `text_encoder/config.json` and loads its weights strictly (see
// load_state_dict) in options.dtype on options.device. The folder's model_index.json must name
// the component transformers/CLIPTextModel.
CLIPTextModel load_text_encoder(const io::ModelFolder& folder, const LoadOptions& options = {},
                                const std::string& variant = "");

}  // namespace sdtrain::models
