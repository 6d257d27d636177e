#include "sdtrain/io/checkpoint_kind.h"

namespace sdtrain::io {
namespace {

const TensorEntry* find(const SafetensorsHeader& header, const std::string& name) {
  for (const auto& entry : header.tensors) {
    if (entry.name == name) return &entry;
  }
  return nullptr;
}

// The first key starting with `prefix` or containing `part`, or "".
std::string first_key(const SafetensorsHeader& header, const std::string& prefix,
                      const std::string& part = "") {
  for (const auto& entry : header.tensors) {
    if (!prefix.empty() && entry.name.starts_with(prefix)) return entry.name;
    if (!part.empty() && entry.name.find(part) != std::string::npos) return entry.name;
  }
  return "";
}

// A1111-era checkpoints may carry the EMA copy of the UNet beside the weights.
std::string ema_note(const SafetensorsHeader& header) {
  return first_key(header, "model_ema.").empty() ? "" : "; holds EMA weights (model_ema.*) too";
}

CheckpointDetection lora(const SafetensorsHeader& header) {
  for (const char* prefix : {"lora_unet_", "lora_te_", "lora_te1_"}) {
    if (auto key = first_key(header, prefix); !key.empty())
      return {CheckpointKind::lora_kohya,
              "LoRA adapters, kohya layout (AUTOMATIC1111, ComfyUI): use with generate --lora",
              {key}};
  }
  if (auto key = first_key(header, "", ".lora_A."); !key.empty())
    return {CheckpointKind::lora_diffusers,
            "LoRA adapters, diffusers layout: use with generate --lora",
            {key}};
  return {};
}

CheckpointDetection stable_diffusion(const SafetensorsHeader& header) {
  const std::string unet = "model.diffusion_model.input_blocks.0.0.weight";
  if (!find(header, unet)) return {};
  const std::string note = ema_note(header);
  const char* open_clip = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight";
  const char* clip = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
  // The cross-attention width: the text encoder's, read off the first cross-attention.
  const TensorEntry* to_k =
      find(header, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight");
  const std::string width =
      to_k && to_k->shape.size() == 2 ? ", cross-attention " + std::to_string(to_k->shape[1]) : "";
  if (find(header, open_clip))
    return {CheckpointKind::sd2_single_file,
            "Stable Diffusion 2.x single file (LDM layout), OpenCLIP ViT-H text encoder" + width +
                "; epsilon or v-prediction cannot be told from the weights" + note,
            {unet, open_clip}};
  if (find(header, clip))
    return {CheckpointKind::sd1_single_file,
            "Stable Diffusion 1.x single file (LDM layout), CLIP ViT-L text encoder" + width + note,
            {unet, clip}};
  return {};
}

}  // namespace

CheckpointDetection detect_checkpoint(const SafetensorsHeader& header) {
  if (auto found = lora(header); found.kind != CheckpointKind::unknown) return found;
  if (auto key = first_key(header, "conditioner.embedders."); !key.empty())
    return {CheckpointKind::sdxl_single_file,
            "Stable Diffusion XL single file (two text encoders): not supported",
            {key}};
  if (auto key = first_key(header, "model.diffusion_model.joint_blocks."); !key.empty())
    return {CheckpointKind::sd3_single_file,
            "Stable Diffusion 3 single file (MMDiT): not supported",
            {key}};
  if (auto found = stable_diffusion(header); found.kind != CheckpointKind::unknown) return found;
  return {
      CheckpointKind::unknown, "not a Stable Diffusion single file or LoRA file sdtrain knows", {}};
}

}  // namespace sdtrain::io
