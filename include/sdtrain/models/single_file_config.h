#pragma once
// The component configurations of a single-file (LDM layout) Stable Diffusion 1.x / 2.x
// checkpoint, as diffusers' config.json files: what a diffusers folder of the same model would
// hold (docs/single_file.md, "What sdtrain builds from a single file").
//
//   * from the shapes: every channel count, the number of blocks and layers, which blocks
//     hold attention, linear or 1x1-convolution transformer projections, the cross-attention
//     width, the text encoder's width, depth and vocabulary;
//   * from the family, where the weights cannot tell: attention heads (SD 1.x: 8 per UNet
//     block, CLIP ViT-L 12; SD 2.x: 64 channels per head), 32 normalisation groups, the VAE's
//     scaling factor 0.18215, the noise schedule (scaled_linear 0.00085..0.012, 1000 steps);
//   * the prediction type, which the weights never tell: single_file_prediction_type, else the
//     `.yaml` sidecar beside the file (A1111's rule: parameterization "v"), else epsilon. An SD
//     2.x v-prediction model is the 768 one: sample_size 96 and upcast attention, as
//     stabilityai/stable-diffusion-2-1's folder has them.
// A file whose architecture these rules cannot build (a width the heads do not divide, ...)
// is refused naming the shape and the fix: single_file_config, a diffusers folder of the same
// architecture whose configs are used instead (diffusers' from_single_file(config=...)).

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/checkpoint_kind.h"
#include "sdtrain/io/safetensors_header.h"

namespace sdtrain::models {

// The configuration keys of a single-file base (docs/configuration.md); the members keep the
// key names.
struct SingleFileOptions {
  std::string single_file_config;           // a diffusers folder whose configs to use
  std::string single_file_prediction_type;  // "", "epsilon" or "v_prediction"
  bool use_ema_weights = false;
};

// What the A1111 `.yaml` sidecar (the original LDM inference config) says, where present.
struct LdmSidecar {
  std::filesystem::path path;
  std::optional<std::string> prediction_type;  // "epsilon" or "v_prediction"
  std::optional<double> scale_factor;          // the VAE's scaling factor
  std::optional<int64_t> num_heads;            // UNet heads per block (SD 1.x style)
  std::optional<int64_t> num_head_channels;    // UNet channels per head (SD 2.x style)
};

// `file` with its extension replaced by .yaml, read when it exists. Throws ModelError naming
// the sidecar when it is not YAML or says something sdtrain cannot use.
std::optional<LdmSidecar> read_ldm_sidecar(const std::filesystem::path& file);

// The sidecar A1111 needs beside a v-prediction file (the LDM inference config, with this
// model's shapes; `open_clip` for SD 2.x): written next to an exported model.safetensors.
std::string ldm_sidecar_text(const nlohmann::json& unet_config, const nlohmann::json& vae_config,
                             const std::string& prediction_type, bool open_clip);

struct SingleFileConfigs {
  io::CheckpointKind family = io::CheckpointKind::unknown;  // sd1_single_file or sd2_single_file
  nlohmann::json unet, vae, text_encoder, scheduler;        // config.json contents
  std::string prediction_type;                              // "epsilon" or "v_prediction"
  std::vector<std::string> notes;  // what was decided from outside the weights, and why
};

// Builds the configurations of `header` (the file at `file`). `prediction_type` is the
// configuration's single_file_prediction_type ("" when unset). Throws ModelError naming the
// file, the tensor and the fix.
SingleFileConfigs infer_single_file_configs(const io::SafetensorsHeader& header,
                                            const std::filesystem::path& file,
                                            const std::string& prediction_type,
                                            const std::optional<LdmSidecar>& sidecar);

}  // namespace sdtrain::models
