#include "sdtrain/train/train_config.h"

#include <algorithm>
#include <map>

#include "config_fields.h"
#include "sdtrain/models/lora_adapters.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::train {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;
using namespace config_fields;

const std::vector<Field>& fields() {
  static const std::vector<Field> all = [] {
    using C = TrainConfig;
    std::vector<Field> f = {
        field("pretrained_model_name_or_path", &C::pretrained_model_name_or_path,
              "Base model: a local diffusers folder (model_index.json, unet/, vae/, text_encoder/, "
              "tokenizer/, scheduler/), or a Stable Diffusion 1.x/2.x single .safetensors file "
              "(docs/single_file.md).",
              {}, {}, true),
        field("single_file_config", &C::single_file, &models::SingleFileOptions::single_file_config,
              "Single-file base only: a diffusers folder of the same architecture whose configs "
              "and tokenizer are used (the weights come from the file). Empty: built from the "
              "file's shapes and family.",
              {}, {}, true),
        field("single_file_prediction_type", &C::single_file,
              &models::SingleFileOptions::single_file_prediction_type,
              "Single-file base only: epsilon or v_prediction, which the weights cannot tell. "
              "Empty: the .yaml sidecar beside the file, else epsilon.",
              one_of({"", "epsilon", "v_prediction"})),
        field("use_ema_weights", &C::single_file, &models::SingleFileOptions::use_ema_weights,
              "Single-file base only: start the UNet from the file's EMA weights (model_ema.*)."),
        field("variant", &C::variant,
              "Weight-file variant to load, e.g. \"fp16\" for *.fp16.safetensors; empty for the "
              "main files."),
        field("instance_data_dir", &C::data, &C::Data::instance_data_dir,
              "Folder of subject photos (png/jpg/jpeg) with dataset_info.json.", {}, {}, true),
        field("class_data_dir", &C::class_images, &C::ClassImages::class_data_dir,
              "Folder of prior-preservation class images; missing ones are generated there. Empty: "
              "<output_dir>/class_images.",
              {}, {}, true),
        field("output_dir", &C::outputs, &C::Outputs::output_dir,
              "Where checkpoints, samples, logs and the final diffusers folder go.", {}, {}, true),
        field("instance_prompt", &C::data, &C::Data::instance_prompt,
              "Prompt with the identifier, e.g. \"a photo of sks cat\". Empty: from "
              "dataset_info.json."),
        field("class_prompt", &C::class_images, &C::ClassImages::class_prompt,
              "Prompt of the class, e.g. \"a photo of a cat\". Empty: from dataset_info.json."),
        field("resolution", &C::data, &C::Data::resolution,
              "Training image size in pixels (shorter side resized, then cropped square); multiple "
              "of 8, at most 4096.",
              in_range(8, 4096)),
        field("center_crop", &C::data, &C::Data::center_crop,
              "Center crop instead of a random crop."),
        field("random_flip", &C::data, &C::Data::random_flip,
              "Flip images horizontally at random."),
        field("with_prior_preservation", &C::class_images, &C::ClassImages::with_prior_preservation,
              "Add the class-image (prior-preservation) loss."),
        field("prior_loss_weight", &C::class_images, &C::ClassImages::prior_loss_weight,
              "Weight of the prior-preservation loss.", at_least(0.0)),
        field("num_class_images", &C::class_images, &C::ClassImages::num_class_images,
              "Class images wanted in class_data_dir; the missing ones are generated.",
              at_least(1)),
        field("sample_batch_size", &C::class_images, &C::ClassImages::sample_batch_size,
              "Batch size when generating class images.", at_least(1)),
        field("prior_generation_precision", &C::class_images,
              &C::ClassImages::prior_generation_precision,
              "Precision of class-image generation: auto (fp16 on GPU, fp32 on CPU), fp32, fp16, "
              "bf16.",
              one_of({"auto", "fp32", "fp16", "bf16"})),
        field("prior_generation_scheduler", &C::class_images,
              &C::ClassImages::prior_generation_scheduler,
              "Sampler for class images; empty: the model's own scheduler.",
              one_of({"", "ddim", "pndm", "euler", "euler_ancestral", "dpmsolver++",
                      "dpmsolver++_karras"})),
        field("prior_generation_steps", &C::class_images, &C::ClassImages::prior_generation_steps,
              "Sampling steps per class image.", at_least(1)),
        field("prior_generation_guidance_scale", &C::class_images,
              &C::ClassImages::prior_generation_guidance_scale,
              "Classifier-free guidance scale for class images.", at_least(0.0)),
        field("train_batch_size", &C::length, &C::Length::train_batch_size,
              "Instance images per step (doubled with prior preservation).", at_least(1),
              {"batch_size"}),
        field("epochs", &C::length, &C::Length::epochs,
              "Passes over the dataset; ignored when max_steps is set.", at_least(1),
              {"num_train_epochs"}),
        optional_field("max_steps", &C::length, &C::Length::max_steps,
                       "Total optimizer steps; overrides epochs.", at_least(1),
                       {"max_train_steps"}),
        field("gradient_accumulation_steps", &C::length, &C::Length::gradient_accumulation_steps,
              "Micro-batches per optimizer step.", at_least(1)),
        field("learning_rate", &C::optimizer, &C::Optimizer::learning_rate, "Peak learning rate.",
              positive()),
        field("scale_lr", &C::optimizer, &C::Optimizer::scale_lr,
              "Multiply learning_rate by train_batch_size x gradient_accumulation_steps (x the "
              "processes under torchrun, as diffusers)."),
        field("lr_scheduler", &C::optimizer, &C::Optimizer::lr_scheduler, "Learning-rate schedule.",
              one_of({"constant", "constant_with_warmup", "linear", "cosine",
                      "cosine_with_restarts", "polynomial"})),
        field("lr_warmup_steps", &C::optimizer, &C::Optimizer::lr_warmup_steps,
              "Linear warm-up steps (not used by \"constant\").", at_least(0)),
        field("lr_num_cycles", &C::optimizer, &C::Optimizer::lr_num_cycles,
              "Hard restarts of cosine_with_restarts.", at_least(1)),
        field("lr_power", &C::optimizer, &C::Optimizer::lr_power,
              "Power of the polynomial schedule.", positive()),
        field("optimizer", &C::optimizer, &C::Optimizer::name,
              "adamw (fp32 states) or adamw8bit (8-bit blockwise states).",
              one_of({"adamw", "adamw8bit"})),
        field("use_8bit_adam", &C::optimizer, &C::Optimizer::use_8bit_adam,
              "Same as optimizer: \"adamw8bit\" (diffusers' flag)."),
        field("adam_beta1", &C::optimizer, &C::Optimizer::adam_beta1, "AdamW beta1.",
              in_unit_interval()),
        field("adam_beta2", &C::optimizer, &C::Optimizer::adam_beta2, "AdamW beta2.",
              in_unit_interval()),
        field("adam_weight_decay", &C::optimizer, &C::Optimizer::adam_weight_decay,
              "AdamW decoupled weight decay.", at_least(0.0)),
        field("adam_epsilon", &C::optimizer, &C::Optimizer::adam_epsilon, "AdamW epsilon.",
              positive()),
        field("max_grad_norm", &C::optimizer, &C::Optimizer::max_grad_norm,
              "Clip the gradient norm to this value; 0 disables clipping.", at_least(0.0)),
        enum_field("mixed_precision", &C::compute, &C::Compute::mixed_precision,
                   "no (fp32), fp16 (with dynamic loss scaling) or bf16.",
                   {{"no", Precision::fp32}, {"fp16", Precision::fp16}, {"bf16", Precision::bf16}}),
        field("gradient_checkpointing", &C::compute, &C::Compute::gradient_checkpointing,
              "Recompute activations in the backward pass to save memory."),
        auto_switch_field(
            "fused_backward_pass", &C::compute, &C::Compute::fused_backward_pass,
            "Step each parameter as soon as its gradient is ready and free the gradient, so "
            "the gradients are never all held (docs/memory.md). auto: on where the result is "
            "unchanged (max_grad_norm 0, no fp16, gradient_accumulation_steps 1) or "
            "memory_budget needs it."),
        auto_switch_field(
            "cuda_graphs", &C::compute, &C::Compute::cuda_graphs,
            "Replay each micro-batch's forward and backward pass from a CUDA graph, so the GPU "
            "does not wait for kernel launches (docs/performance.md); with fused_backward_pass "
            "and adamw8bit the graph holds the optimizer's steps too. auto: on a GPU unless data "
            "parallel, fused_backward_pass with another optimizer or gradient accumulation "
            "stands in the way (one logged line says which), and off again if the capture or "
            "its check fails; true: refuse those."),
        field("fused_group_norm_silu", &C::compute, &C::Compute::fused_group_norm_silu,
              "Run each GroupNorm + SiLU of the UNet and VAE, and each GroupNorm of the UNet's "
              "attention blocks, as one node with CUDA kernels that read and write the "
              "activations' dtype and keep only the input for backward (docs/performance.md). "
              "Off by default until its GPU test and benchmark have run; on the CPU the same "
              "formulas run as torch operations, slower than torch's own GroupNorm (the "
              "reference the GPU kernels are tested against)."),
        field("channels_last", &C::compute, &C::Compute::channels_last,
              "Store the UNet's and the VAE's convolution weights channels-last (NHWC), so "
              "their activations follow: cuDNN computes convolutions in NHWC and transposes "
              "NCHW tensors in and out (docs/performance.md). Pair it with "
              "fused_group_norm_silu, whose kernels keep NHWC (torch's CUDA GroupNorm makes its "
              "input NCHW). Off by default until a GPU has measured it. Must stay the same on "
              "resume: the optimizer's states follow each weight's storage order."),
        enum_field("attention_backend", &C::compute, &C::Compute::attention_backend,
                   "The attention kernel tried first: auto (torch's order: flash, efficient, "
                   "math, cudnn on CUDA; flash, then math on the CPU), flash, efficient "
                   "(memory-efficient), cudnn or math (unfused, for comparison: it holds each "
                   "attention's score matrix, which the memory plan does not count). Attention "
                   "the chosen kernel cannot run "
                   "(flash: heads wider than 256, such as the VAE's, or a GPU before sm80) falls "
                   "back to torch's order; the log names the kernel each kind of attention ran "
                   "on after the first step (docs/performance.md).",
                   models::attention_backend_names()),
        enum_field("weight_dtype", &C::compute, &C::Compute::weight_dtype,
                   "Storage of the trained weights: fp32, or bf16 (lean mode: half the memory, "
                   "updated by adamw8bit with stochastic rounding; docs/memory.md).",
                   {{"fp32", Precision::fp32}, {"bf16", Precision::bf16}}),
        memory_budget_field(
            "memory_budget", &C::compute, &C::Compute::memory_budget,
            "null, \"auto\" (the GPU's free memory) or GiB: the plan picks the leanest "
            "settings whose estimate fits, and prints what it chose and why."),
        field("train_text_encoder", &C::train_text_encoder, "Fine-tune the text encoder too."),
        field("cache_latents", &C::data, &C::Data::cache_latents,
              "Encode each training image with the VAE once instead of every step."),
        field("allow_tf32", &C::compute, &C::Compute::allow_tf32,
              "Allow TF32 matrix multiplication on Ampere and newer GPUs."),
        field("use_ema", &C::ema, &C::Ema::use_ema,
              "Keep an exponential moving average of the UNet weights."),
        field("ema_decay", &C::ema, &C::Ema::ema_decay, "EMA decay.", in_unit_interval()),
        field("offload_ema", &C::ema, &C::Ema::offload_ema,
              "With use_ema: keep the EMA weights in host memory (4 bytes per UNet parameter "
              "off the GPU; copying the weights there waits for the GPU every step). false "
              "keeps them on the training device, where the update is queued like the "
              "optimizer's (diffusers' default)."),
        field("offset_noise", &C::loss, &C::Loss::offset_noise,
              "Add 0.1 x N(0,1) per sample and channel to the noise (diffusers' --offset_noise)."),
        optional_field("snr_gamma", &C::loss, &C::Loss::snr_gamma,
                       "Min-SNR loss weighting gamma (5.0 is the usual value); null disables it.",
                       positive()),
        enum_field("train_mode", &C::lora, &C::Lora::train_mode,
                   "full (every weight of the UNet, and of the text encoder with "
                   "train_text_encoder) or lora (adapters on them, the base frozen).",
                   {{"full", TrainMode::full}, {"lora", TrainMode::lora}}),
        field("lora_rank", &C::lora, &C::Lora::lora_rank, "LoRA rank r of every adapter.",
              in_range(1, 1024)),
        optional_field("lora_alpha", &C::lora, &C::Lora::lora_alpha,
                       "LoRA alpha: the adapter's output is scaled by alpha / rank; null: the "
                       "rank (a scale of 1), as diffusers.",
                       positive()),
        field("lora_dropout", &C::lora, &C::Lora::lora_dropout,
              "Dropout on the adapters' input during training.", in_unit_interval()),
        field("lora_unet_targets", &C::lora, &C::Lora::lora_unet_targets,
              "UNet layers given adapters (diffusers' module names): to_q, to_k, to_v, to_out.0 "
              "(attention), ff.net.0.proj, ff.net.2 (feed-forward), proj_in, proj_out, conv1, "
              "conv2, conv_shortcut, time_emb_proj (resnets), downsamplers.0.conv, "
              "upsamplers.0.conv.",
              each_of(models::unet_adapter_target_names())),
        field("lora_formats", &C::lora, &C::Lora::lora_formats,
              "LoRA files written at the end: diffusers (pytorch_lora_weights.safetensors) "
              "and/or kohya (lora_kohya.safetensors, for AUTOMATIC1111 and ComfyUI).",
              each_of({"diffusers", "kohya"})),
        field("checkpointing_steps", &C::outputs, &C::Outputs::checkpointing_steps,
              "Save a resumable checkpoint every N optimizer steps.", at_least(1)),
        optional_field("checkpoints_total_limit", &C::outputs, &C::Outputs::checkpoints_total_limit,
                       "Keep at most this many checkpoints; null keeps all.", at_least(1)),
        field("resume_from_checkpoint", &C::outputs, &C::Outputs::resume_from_checkpoint,
              "\"latest\", a checkpoint folder (checkpoint-N, looked up in output_dir too), or "
              "empty to start fresh."),
        field("resume_reset_epoch", &C::outputs, &C::Outputs::resume_reset_epoch,
              "When the photos or class images changed since the checkpoint: resume at the start "
              "of the next epoch, keeping the step count."),
        field("validation_prompts", &C::outputs, &C::Outputs::validation_prompts,
              "Prompts sampled every validation_steps into output_dir/samples/."),
        field("validation_steps", &C::outputs, &C::Outputs::validation_steps,
              "Sample validation images every N optimizer steps.", at_least(1)),
        field("num_validation_images", &C::outputs, &C::Outputs::num_validation_images,
              "Images per validation prompt.", at_least(1)),
        enum_field("save_dtype", &C::outputs, &C::Outputs::save_dtype,
                   "Precision of the final diffusers folder: fp32 or fp16.",
                   {{"fp32", Precision::fp32}, {"fp16", Precision::fp16}}),
        enum_field("save_format", &C::outputs, &C::Outputs::save_format,
                   "The final model of a full run: diffusers (a folder), single_file "
                   "(output_dir/model.safetensors in the original LDM layout, for AUTOMATIC1111 "
                   "and ComfyUI) or both.",
                   {{"diffusers", SaveFormat::diffusers},
                    {"single_file", SaveFormat::single_file},
                    {"both", SaveFormat::both}}),
        field("seed", &C::seed,
              "Seed of every random choice (data order, noise, timesteps, sampling).",
              at_least<int64_t>(0)),
        field("device", &C::device, "auto (CUDA when available), cpu, cuda or cuda:N."),
    };
    TrainConfig defaults;
    for (auto& entry : f) entry.info.default_value = entry.get(defaults).dump();
    return f;
  }();
  return all;
}

const Field* find_field(const std::string& key) {
  for (const auto& f : fields()) {
    if (f.info.name == key) return &f;
    for (const auto& alias : f.info.aliases) {
      if (alias == key) return &f;
    }
  }
  return nullptr;
}

std::size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

void apply(TrainConfig& config, const std::string& key, const json& value, const Origin& origin,
           std::map<std::string, std::string>& seen) {
  const Field* f = find_field(key);
  if (!f) {
    std::string suggestion = suggest_key(key);
    throw ConfigError(origin.source + ": unknown key \"" + key + "\"" +
                      (suggestion.empty() ? "" : "; did you mean \"" + suggestion + "\"?") +
                      " (every key is listed in docs/configuration.md)");
  }
  auto [it, inserted] = seen.emplace(f->info.name, key);
  if (!inserted && it->second != key) {
    throw ConfigError(origin.source + ": \"" + key + "\" and \"" + it->second +
                      "\" are the same setting; give only one");
  }
  f->set(config, value, origin);
}

// diffusers' train_dreambooth_lora.py trains adapters at its default learning rate of 5e-4
// (train_dreambooth.py's full fine-tune: 5e-6); a LoRA run that names no learning_rate gets it.
// A lora_* key set away from its default in a full run would silently do nothing: an error.
void apply_train_mode(TrainConfig& config, const std::map<std::string, std::string>& seen,
                      const fs::path& config_file) {
  if (config.lora.train_mode == TrainMode::lora) {
    if (!seen.count("learning_rate")) config.optimizer.learning_rate = 5e-4;
    return;
  }
  const TrainConfig defaults;
  for (const auto& [name, spelled] : seen) {
    // train_config.json lists every key, the lora_* ones at their defaults in a full run.
    if (!name.starts_with("lora_") ||
        find_field(name)->get(config) == find_field(name)->get(defaults))
      continue;
    throw ConfigError((config_file.empty() ? std::string("--set") : config_file.string()) +
                      ": key \"" + spelled +
                      "\" applies to LoRA training only; add \"train_mode\": \"lora\" or "
                      "remove it");
  }
}

}  // namespace

std::string TrainConfig::resolved_optimizer() const {
  return optimizer.use_8bit_adam ? "adamw8bit" : optimizer.name;
}

nlohmann::ordered_json TrainConfig::to_json() const {
  nlohmann::ordered_json out;
  for (const auto& f : fields()) out[f.info.name] = f.get(*this);
  return out;
}

const std::vector<ConfigKeyInfo>& config_keys() {
  static const std::vector<ConfigKeyInfo> keys = [] {
    std::vector<ConfigKeyInfo> k;
    for (const auto& f : fields()) k.push_back(f.info);
    return k;
  }();
  return keys;
}

std::string suggest_key(const std::string& unknown) {
  std::string best;
  std::size_t best_distance = std::max<std::size_t>(3, unknown.size() / 3) + 1;
  for (const auto& f : fields()) {
    std::vector<std::string> names = f.info.aliases;
    names.push_back(f.info.name);
    for (const auto& name : names) {
      std::size_t d = edit_distance(unknown, name);
      if (d < best_distance) {
        best_distance = d;
        best = f.info.name;
      }
    }
  }
  return best;
}

TrainConfig load_train_config(const fs::path& config_file,
                              const std::vector<std::string>& overrides, const ConfigLayer* layer) {
  TrainConfig config;
  std::map<std::string, std::string> seen;
  if (!config_file.empty()) {
    json file = read_json_file(config_file, ExitCode::usage);
    if (!file.is_object())
      throw ConfigError(config_file.string() + ": the configuration must be a JSON object");
    Origin origin{config_file.string(), fs::absolute(config_file).parent_path()};
    for (const auto& [key, value] : file.items()) apply(config, key, value, origin, seen);
  }
  if (layer) {
    if (!layer->values.is_object())
      throw ConfigError(layer->source + ": expected a JSON object of configuration keys");
    Origin origin{layer->source, fs::absolute(layer->base_dir)};
    std::map<std::string, std::string> seen_in_layer;
    for (const auto& [key, value] : layer->values.items()) {
      apply(config, key, value, origin, seen_in_layer);
      seen.emplace(find_field(key)->info.name, key);
    }
  }
  Origin command_line{"--set", fs::current_path()};
  std::map<std::string, std::string> seen_overrides;
  for (const auto& assignment : overrides) {
    auto equals = assignment.find('=');
    if (equals == std::string::npos || equals == 0) {
      throw ConfigError("--set " + assignment + ": expected key=value, e.g. --set max_steps=400");
    }
    std::string key = assignment.substr(0, equals);
    std::string text = assignment.substr(equals + 1);
    json value = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (value.is_discarded())
      value = text;  // plain words are strings: --set 'instance_prompt=a photo'
    apply(config, key, value, command_line, seen_overrides);
    seen.emplace(find_field(key)->info.name, key);
  }
  // diffusers' flag picks the optimizer unless "optimizer" itself was given (check_config() then
  // rejects the contradiction of use_8bit_adam with "adamw").
  if (config.optimizer.use_8bit_adam && !seen.count("optimizer"))
    config.optimizer.name = "adamw8bit";
  apply_train_mode(config, seen, config_file);
  // Paths left at their defaults (output_dir) are relative to the working directory; the
  // resolved configuration holds only absolute paths, so it means the same from anywhere.
  for (const auto& f : fields()) {
    if (!f.is_path) continue;
    std::string value = f.get(config).get<std::string>();
    if (!value.empty() && fs::path(value).is_relative()) {
      f.set(config, (fs::current_path() / value).lexically_normal().string(), command_line);
    }
  }
  check_config(config);
  return config;
}

void check_config(const TrainConfig& c) {
  auto require = [](bool ok, const std::string& message) {
    if (!ok) throw ConfigError(message);
  };
  require(!c.pretrained_model_name_or_path.empty(),
          "\"pretrained_model_name_or_path\" is required: the local diffusers folder of the base "
          "model");
  require(!c.data.instance_data_dir.empty(),
          "\"instance_data_dir\" is required: the folder of subject photos");
  require(!c.outputs.output_dir.empty(), "\"output_dir\" must not be empty");
  require(c.data.resolution % 8 == 0,
          "\"resolution\" must be a multiple of 8 (the VAE downsamples by 8), got " +
              std::to_string(c.data.resolution));
  require(!(c.optimizer.use_8bit_adam && c.optimizer.name == "adamw"),
          "\"use_8bit_adam\": true contradicts \"optimizer\": \"adamw\"; use one of them "
          "(optimizer: \"adamw8bit\")");
  require(!(c.data.cache_latents && c.data.random_flip),
          "\"cache_latents\" encodes each image once, so \"random_flip\" would never apply; set "
          "one of them to false");
  require(
      !(c.data.cache_latents && !c.data.center_crop),
      "\"cache_latents\" encodes each image once, so a random crop would be chosen once and kept; "
      "set \"center_crop\": true or \"cache_latents\": false");
  require(!(c.outputs.resume_from_checkpoint == "latest" && c.outputs.output_dir.empty()),
          "\"resume_from_checkpoint\": \"latest\" needs \"output_dir\"");
  bool valid_device = c.device == "auto" || c.device == "cpu" || c.device == "cuda" ||
                      c.device.starts_with("cuda:");
  require(valid_device, "\"device\" must be auto, cpu, cuda or cuda:N, got \"" + c.device + "\"");
  for (const auto& prompt : c.outputs.validation_prompts) {
    require(!prompt.empty(), "\"validation_prompts\" contains an empty prompt");
  }
  require(!(c.lora.train_mode == TrainMode::lora && c.outputs.save_format != SaveFormat::diffusers),
          "\"save_format\" applies to full fine-tuning; a LoRA run writes adapter files (see "
          "\"lora_formats\")");
  // Gradient checkpointing recomputes each block in backward without replaying the random
  // state (models/gradient_checkpointing.h), so a dropout mask would differ between the two.
  require(!(c.lora.lora_dropout > 0 && c.compute.gradient_checkpointing),
          "\"lora_dropout\" > 0 with \"gradient_checkpointing\": the recomputed pass would drop "
          "other inputs than the first; set one of them off");
}

}  // namespace sdtrain::train
