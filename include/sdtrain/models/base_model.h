#pragma once
// Opening the base model a run or `generate` starts from: a diffusers folder, or one
// single-file (LDM layout) .safetensors checkpoint of SD 1.x / 2.x (docs/single_file.md).
// A single file gets a generated configuration folder (model_index.json, the component
// configs of models/single_file_config.h, the bundled tokenizer) that lives as long as the
// returned ModelFolder; its weights are read from the file by load_component_weights. The rest
// of sdtrain sees a ModelFolder either way.

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <string>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/single_file.h"
#include "sdtrain/models/single_file_config.h"
#include "sdtrain/models/state_dict.h"

namespace sdtrain::models {

// A folder is opened as it is. A file: an SD 1.x/2.x single file is opened as above; a pickle
// (.ckpt, .pt, .pth, .bin) is refused because loading one can run code; any other
// .safetensors file (SDXL, SD3, LoRA adapters, unknown) is refused naming what it is and the
// key that decided it. Errors are ModelError (exit code 3); options given for a folder are a
// ConfigError (they would do nothing).
io::ModelFolder open_base_model(const std::filesystem::path& path,
                                const SingleFileOptions& options = {});

// The weights of model component `name` ("unet", "vae", "text_encoder") of `folder` into
// `module` (built from the folder's config), strictly: from the folder's files (`variant`,
// `map_key` as load_state_dict takes them), or from the single file.
void load_component_weights(torch::nn::Module& module, const io::ModelFolder& folder,
                            const std::string& name, const LoadOptions& options,
                            const std::string& variant, const KeyMapper& map_key = {});

// The single-file key layout of the model `folder` configures (its UNet, VAE and text encoder
// configs). ModelError naming the UNet config when no single file can hold it.
SingleFileLayout single_file_layout(const io::ModelFolder& folder);

// Writes `components` (every model component's diffusers state dict) as one single file in
// `dtype` at `path`, with `metadata`, and applies A1111's sidecar rule beside it: the model's
// LDM config as `path` with .yaml for a v-prediction `base` (its scheduler config), no such
// file otherwise (a stale one is removed). Returns whether a sidecar was written.
bool write_single_file(const std::filesystem::path& path, const io::ModelFolder& base,
                       const std::map<std::string, io::NamedTensors>& components,
                       c10::ScalarType dtype, const std::map<std::string, std::string>& metadata);

// Adds to `components` ("unet", "vae", "text_encoder" -> diffusers state dict) those of the
// three it lacks, read from the base in float32 on the CPU: the untrained parts of a model
// being written out.
void add_base_components(const io::ModelFolder& folder, const std::string& variant,
                         std::map<std::string, io::NamedTensors>& components);

}  // namespace sdtrain::models
