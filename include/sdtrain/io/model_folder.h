#pragma once
// A model folder in diffusers layout (what StableDiffusionPipeline.save_pretrained writes and
// what the Hub serves): model_index.json naming the components, one sub-folder per component
// with its config and safetensors weights. Only headers are read here; the models issue's
// loaders read the tensors.

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/safetensors_header.h"

namespace sdtrain::io {

// The safetensors files that hold one component's weights: a single file, or the shards named
// by an index JSON (diffusers/transformers sharding), optionally of a variant such as "fp16".
struct WeightFiles {
  std::vector<std::filesystem::path> files;
  std::optional<std::filesystem::path> index;  // set for sharded checkpoints
  std::string variant;
};

// Looks for `<base>[.<variant>].safetensors`, then the sharded index
// `<base>.safetensors.index[.<variant>].json`, in `component_dir`. base is
// "diffusion_pytorch_model" (diffusers) or "model" (transformers). With a variant, the variant
// files are required. Throws ModelError saying what was looked for (and that .bin/.ckpt
// pickles are not read) when nothing fits.
WeightFiles find_weight_files(const std::filesystem::path& component_dir, const std::string& base,
                              const std::string& variant = "");

// Headers of every file, with the index's weight_map checked against them (every mapped
// tensor present in the file it names).
std::vector<SafetensorsHeader> read_weight_headers(const WeightFiles& weights);

struct Component {
  std::string name;        // "unet", "vae", ...
  std::string library;     // "diffusers", "transformers"
  std::string class_name;  // "UNet2DConditionModel", ...
  std::filesystem::path dir;
};

class ModelFolder {
 public:
  // Reads and validates model_index.json; every non-null component must have its folder.
  explicit ModelFolder(const std::filesystem::path& root);

  const std::filesystem::path& root() const { return root_; }
  const std::string& pipeline_class() const { return pipeline_class_; }
  const std::vector<Component>& components() const { return components_; }
  const Component* find(const std::string& name) const;
  // Throws ModelError naming the folder when the component is absent.
  const Component& require(const std::string& name) const;

  // The component's configuration file: config.json, scheduler_config.json,
  // tokenizer_config.json or preprocessor_config.json, whichever it has.
  nlohmann::json config(const std::string& name) const;
  std::filesystem::path config_path(const std::string& name) const;

  // Weight files of a model component (base file name chosen from its library).
  WeightFiles weights(const std::string& name, const std::string& variant = "") const;

 private:
  std::filesystem::path root_;
  std::string pipeline_class_;
  std::vector<Component> components_;
};

// The components Stable Diffusion training and sampling need.
inline const std::vector<std::string>& stable_diffusion_components() {
  static const std::vector<std::string> names = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"};
  return names;
}

}  // namespace sdtrain::io
