#pragma once
// What a .safetensors file holds, told from its header alone (names and shapes): a single-file
// Stable Diffusion checkpoint of a family, a LoRA adapter file of a layout, or something else.
// `sdtrain inspect` reports it; loading a single file as a base will refuse the kinds it cannot
// train (SDXL, SD3, adapters) with it (docs/single_file.md).

#include <string>
#include <vector>

#include "sdtrain/io/safetensors_header.h"

namespace sdtrain::io {

enum class CheckpointKind {
  sd1_single_file,  // LDM layout, OpenAI CLIP ViT-L text encoder (cross-attention 768)
  sd2_single_file,  // LDM layout, OpenCLIP ViT-H text encoder (cross-attention 1024)
  sdxl_single_file,
  sd3_single_file,
  lora_diffusers,
  lora_kohya,
  unknown,
};

struct CheckpointDetection {
  CheckpointKind kind = CheckpointKind::unknown;
  std::string description;            // one line for people
  std::vector<std::string> evidence;  // the keys that decided it
};

CheckpointDetection detect_checkpoint(const SafetensorsHeader& header);

}  // namespace sdtrain::io
