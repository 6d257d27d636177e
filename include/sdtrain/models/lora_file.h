#pragma once
// LoRA adapter files in the two layouts people use (docs/lora.md):
//  * diffusers (what train_dreambooth_lora.py writes and StableDiffusionPipeline
//    .load_lora_weights reads): "unet.<layer>.lora_A.weight", "unet.<layer>.lora_B.weight",
//    "text_encoder.<layer>.lora_A.weight", ...; rank and alpha in the "lora_adapter_metadata"
//    JSON of the safetensors metadata as peft's LoraConfig fields ("unet.r", "unet.lora_alpha").
//  * kohya (sd-scripts; what AUTOMATIC1111 and ComfyUI load): "lora_unet_<layer with _ for .>"
//    and "lora_te_<layer>" with ".lora_down.weight" (= A), ".lora_up.weight" (= B) and
//    ".alpha" (a scalar). The layer names are diffusers' module paths, so a kohya name is
//    resolved by spelling every adapter-capable layer of the model that way.
// Reading checks every key and shape against the base model before anything is attached.

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "sdtrain/models/lora_adapters.h"

namespace sdtrain::models {

enum class LoRALayout { diffusers, kohya };
std::string to_string(LoRALayout layout);

struct AdapterWeights {
  torch::Tensor A;  // [r, in] or [r, in, kh, kw]
  torch::Tensor B;  // [out, r] or [out, r, 1, 1]
  double alpha = 0;
};
// Layer path -> adapter, in the model's module order.
using ComponentAdapters = std::vector<std::pair<std::string, AdapterWeights>>;

// The models a file's adapters go on, by component name ("unet", "text_encoder").
using AdapterModels = std::map<std::string, torch::nn::Module*>;

struct LoRAFile {
  std::filesystem::path path;
  LoRALayout layout = LoRALayout::diffusers;
  std::map<std::string, ComponentAdapters> components;
  std::map<std::string, std::string> metadata;
};

// Reads `path` in either layout (detected from its keys) and checks it against `models`: every
// adapter names a layer of its component that can carry one, with shapes that fit the layer.
// Throws ModelError (exit 3) naming the file and the first mismatching keys.
LoRAFile read_lora_file(const std::filesystem::path& path, const AdapterModels& models);

// Attaches the file's adapters (checked by read_lora_file against the same models) in `dtype`
// on each layer's device, scaled by `multiplier` (generate --lora FILE:SCALE).
void attach_lora_file(const LoRAFile& file, const AdapterModels& models, double multiplier,
                      c10::ScalarType dtype = torch::kFloat);

// The adapters attached to `root` now: A, B (detached) and alpha.
ComponentAdapters attached_adapter_weights(torch::nn::Module& root);

// What a written file records of the run: peft LoraConfig fields per component (rank, alpha,
// targets) for diffusers, and descriptive metadata (base model, prompt, version) for both.
struct LoRAWriteOptions {
  struct Component {
    int64_t rank = 4;
    double alpha = 4;
    double dropout = 0;
    std::vector<std::string> targets;
  };
  std::map<std::string, Component> components;
  std::map<std::string, std::string> metadata;  // copied into __metadata__
  c10::ScalarType dtype = torch::kFloat;
};

void write_diffusers_lora(const std::filesystem::path& path,
                          const std::map<std::string, ComponentAdapters>& adapters,
                          const LoRAWriteOptions& options);
void write_kohya_lora(const std::filesystem::path& path,
                      const std::map<std::string, ComponentAdapters>& adapters,
                      const LoRAWriteOptions& options);

// kohya's name of a layer: "lora_unet_down_blocks_0_..." / "lora_te_text_model_...".
std::string kohya_lora_name(const std::string& component, const std::string& layer_path);

}  // namespace sdtrain::models
