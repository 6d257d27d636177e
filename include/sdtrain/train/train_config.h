#pragma once
// The training configuration: every key of `sdtrain --config FILE`, named and defaulted as
// diffusers' train_dreambooth.py and SageMaker JumpStart name them (JumpStart's SD 2.1-base
// defaults where the two differ), parsed from JSON plus `--set key=value` overrides and
// validated once. docs/configuration.md documents every key; a test keeps the two in step.

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "sdtrain/models/attention_backend_choice.h"
#include "sdtrain/models/single_file_config.h"
#include "sdtrain/train/precision.h"

namespace sdtrain::train {

// The final model of a full run: a diffusers folder, one single file (LDM layout), or both.
enum class SaveFormat { diffusers, single_file, both };

// What a run trains: every weight of the trained models, or LoRA adapters beside frozen ones.
enum class TrainMode { full, lora };

// A setting the trainer may decide itself ("auto") or the user fixes (true / false).
enum class AutoSwitch { automatic, on, off };

// memory_budget: none (null), the GPU's free memory ("auto"), or a number of GiB.
struct MemoryBudget {
  enum class Kind { none, automatic, gib } kind = Kind::none;
  double gib = 0;
};

struct TrainConfig {
  // The user-facing keys are flat (diffusers' and JumpStart's names); the struct groups them by
  // the piece of the trainer that reads them. Members keep the key names, so a key found in
  // docs/configuration.md is found here as group.key.
  std::string pretrained_model_name_or_path;
  std::string variant;
  models::SingleFileOptions single_file;  // a single-file base (docs/single_file.md)
  bool train_text_encoder = false;
  int64_t seed = 0;
  std::string device = "auto";

  struct Data {
    std::string instance_data_dir;
    std::string instance_prompt;
    int resolution = 512;
    bool center_crop = false;
    bool random_flip = false;
    bool cache_latents = false;
  } data;

  struct ClassImages {  // prior preservation
    bool with_prior_preservation = false;
    std::string class_data_dir;
    std::string class_prompt;
    double prior_loss_weight = 1.0;
    int num_class_images = 100;
    int sample_batch_size = 4;
    std::string prior_generation_precision = "auto";  // pipeline::resolve_dtype's names
    std::string prior_generation_scheduler;
    int prior_generation_steps = 50;
    double prior_generation_guidance_scale = 7.5;
  } class_images;

  struct Length {
    int train_batch_size = 1;
    int epochs = 20;
    std::optional<int> max_steps;
    int gradient_accumulation_steps = 1;
  } length;

  struct Optimizer {
    std::string name = "adamw";  // key "optimizer"
    bool use_8bit_adam = false;
    double learning_rate = 2e-6;
    bool scale_lr = false;
    std::string lr_scheduler = "constant";
    int lr_warmup_steps = 0;
    int lr_num_cycles = 1;
    double lr_power = 1.0;
    double adam_beta1 = 0.9;
    double adam_beta2 = 0.999;
    double adam_weight_decay = 1e-2;
    double adam_epsilon = 1e-8;
    double max_grad_norm = 1.0;
  } optimizer;

  struct Compute {
    Precision mixed_precision = Precision::fp32;  // key values "no", "fp16", "bf16"
    bool gradient_checkpointing = false;
    bool allow_tf32 = false;
    // Lean memory (docs/memory.md): step each parameter from the backward pass, keep the
    // trained weights in bf16, and let the plan pick settings that fit a memory budget.
    AutoSwitch fused_backward_pass = AutoSwitch::automatic;
    Precision weight_dtype = Precision::fp32;  // key values "fp32", "bf16"
    MemoryBudget memory_budget;
    // Replay each micro-batch's forward and backward pass from a CUDA graph
    // (train/micro_batch_pass.h, docs/performance.md).
    AutoSwitch cuda_graphs = AutoSwitch::automatic;
    // GroupNorm + SiLU of the UNet's and VAE's resnets as one autograd node with CUDA kernels
    // (models/group_norm_silu.h, docs/performance.md).
    bool fused_group_norm_silu = false;
    // The UNet's convolution weights, and so its activations, stored channels-last (NHWC)
    // (models/state_dict.h, docs/performance.md).
    bool channels_last = false;
    // The attention kernel SDPA tries first (models/attention_backend.h).
    models::AttentionBackend attention_backend = models::AttentionBackend::automatic;
  } compute;

  struct Ema {
    bool use_ema = false;
    double ema_decay = 0.9999;
    // The shadow in host memory (true) or on the training device (false, diffusers' default
    // without --offload_ema): docs/performance.md, "What still synchronises".
    bool offload_ema = true;
  } ema;

  struct Loss {
    bool offset_noise = false;
    std::optional<double> snr_gamma;
  } loss;

  struct Lora {  // train_mode "lora": the adapters and the files they are written to
    TrainMode train_mode = TrainMode::full;
    int lora_rank = 4;                 // diffusers' default
    std::optional<double> lora_alpha;  // null: the rank (a scale of 1), as diffusers
    double lora_dropout = 0.0;
    std::vector<std::string> lora_unet_targets = {"to_q", "to_k", "to_v", "to_out.0"};
    std::vector<std::string> lora_formats = {"diffusers"};  // and/or "kohya"
    double alpha() const { return lora_alpha.value_or(static_cast<double>(lora_rank)); }
  } lora;

  struct Outputs {  // checkpoints, validation and the exported model
    std::string output_dir = "dreambooth-model";
    int checkpointing_steps = 500;
    std::optional<int> checkpoints_total_limit;
    std::string resume_from_checkpoint;
    bool resume_reset_epoch = false;
    std::vector<std::string> validation_prompts;
    int validation_steps = 100;
    int num_validation_images = 4;
    Precision save_dtype = Precision::fp32;  // key values "fp32", "fp16"
    SaveFormat save_format = SaveFormat::diffusers;
  } outputs;

  // The optimizer actually used ("adamw" or "adamw8bit"), after use_8bit_adam.
  std::string resolved_optimizer() const;
  // Every key with its value, canonical names only (what train_config.json holds).
  nlohmann::ordered_json to_json() const;
};

// One documented key of the configuration, for docs and error suggestions.
struct ConfigKeyInfo {
  std::string name;
  std::vector<std::string> aliases;
  std::string type;           // "bool", "int", "number", "string", "path", "list of strings", ...
  std::string default_value;  // as JSON
  std::string help;
};
const std::vector<ConfigKeyInfo>& config_keys();

// Keys laid over the configuration file before the overrides: one line of a subjects manifest
// (docs/scaling.md). Its relative paths are relative to `base_dir`; errors name `source`.
struct ConfigLayer {
  nlohmann::json values;  // an object
  std::string source;     // e.g. "subjects.jsonl line 3"
  std::filesystem::path base_dir;
};

// Parses `config_file` (may be empty: defaults only), then applies `layer` (when given), then
// `overrides` ("key=value"; value as JSON when it parses, else as a string), then validates.
// Paths in the file are relative to the file's folder; paths in overrides are relative to the
// working directory. Throws ConfigError (exit 1) naming the file and key.
TrainConfig load_train_config(const std::filesystem::path& config_file,
                              const std::vector<std::string>& overrides,
                              const ConfigLayer* layer = nullptr);

// Cross-key checks that do not need the model or the data. Throws ConfigError.
void check_config(const TrainConfig& config);

// The valid key nearest to `unknown` (edit distance), or "" when none is close.
std::string suggest_key(const std::string& unknown);

}  // namespace sdtrain::train
