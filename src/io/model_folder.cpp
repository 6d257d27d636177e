#include "sdtrain/io/model_folder.h"

#include <algorithm>
#include <map>
#include <set>

#include "sdtrain/io/host_weights.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::io {
namespace fs = std::filesystem;

namespace {

std::string with_variant(const std::string& stem, const std::string& extension,
                         const std::string& variant) {
  return variant.empty() ? stem + extension : stem + "." + variant + extension;
}

WeightFiles from_index(const fs::path& index_path, const std::string& variant) {
  auto index = read_json_file(index_path, ExitCode::model);
  if (!index.contains("weight_map") || !index["weight_map"].is_object()) {
    throw ModelError(index_path.string() + ": sharded index has no \"weight_map\" object");
  }
  WeightFiles weights;
  weights.index = index_path;
  weights.variant = variant;
  std::set<std::string> shard_names;
  for (const auto& [tensor, file] : index["weight_map"].items()) {
    if (!file.is_string())
      throw ModelError(index_path.string() + ": weight_map entry '" + tensor +
                       "' is not a file name");
    shard_names.insert(file.get<std::string>());
  }
  for (const auto& shard : shard_names) {
    fs::path path = index_path.parent_path() / shard;
    if (!fs::exists(path)) {
      throw ModelError(index_path.string() + " names shard " + shard + ", which is missing from " +
                       index_path.parent_path().string());
    }
    weights.files.push_back(path);
  }
  return weights;
}

}  // namespace

WeightFiles find_weight_files(const fs::path& component_dir, const std::string& base,
                              const std::string& variant) {
  fs::path single = component_dir / with_variant(base, ".safetensors", variant);
  if (fs::exists(single)) return WeightFiles{{single}, std::nullopt, variant};
  // diffusers puts the variant before ".json": <base>.safetensors.index.fp16.json
  fs::path index = component_dir / with_variant(base + ".safetensors.index", ".json", variant);
  if (fs::exists(index)) return from_index(index, variant);

  std::string message = component_dir.string() + ": no safetensors weights (looked for " +
                        single.filename().string() + " and " + index.filename().string() + ")";
  for (const char* pickle : {".bin", ".ckpt", ".pt"}) {
    if (fs::exists(component_dir / with_variant(base, pickle, variant))) {
      message += "; found " + with_variant(base, pickle, variant) +
                 ", a pickle, which sdtrain does not read: convert it once with "
                 "`save_pretrained(..., safe_serialization=True)` in diffusers/transformers";
    }
  }
  if (!variant.empty() && fs::exists(component_dir / (base + ".safetensors"))) {
    message += "; the folder has non-variant weights: drop the \"" + variant + "\" variant";
  }
  throw ModelError(message);
}

std::vector<SafetensorsHeader> read_weight_headers(const WeightFiles& weights) {
  std::vector<SafetensorsHeader> headers;
  std::map<std::string, std::string> owner;  // tensor -> file it was found in
  for (const auto& file : weights.files) {
    headers.push_back(read_safetensors_header(file));
    for (const auto& tensor : headers.back().tensors) {
      auto [it, inserted] = owner.emplace(tensor.name, file.filename().string());
      if (!inserted) {
        throw ModelError(file.string() + ": tensor '" + tensor.name + "' also appears in " +
                         it->second);
      }
    }
  }
  if (weights.index) {
    auto index = read_json_file(*weights.index, ExitCode::model);
    for (const auto& [tensor, file] : index["weight_map"].items()) {
      auto it = owner.find(tensor);
      if (it == owner.end() || it->second != file.get<std::string>()) {
        throw ModelError(weights.index->string() + ": tensor '" + tensor + "' is mapped to " +
                         file.get<std::string>() + " but that shard does not contain it");
      }
    }
  }
  return headers;
}

ModelFolder::ModelFolder(const fs::path& root) : root_(root) {
  if (!fs::is_directory(root)) {
    throw ModelError(root.string() +
                     ": model folder not found (expected a diffusers folder with "
                     "model_index.json, e.g. a local copy of "
                     "stabilityai/stable-diffusion-2-1-base, or a single-file .safetensors)");
  }
  fs::path index_path = root / "model_index.json";
  if (!fs::exists(index_path)) {
    throw ModelError(index_path.string() + ": file not found; " + root.string() +
                     " is not a diffusers model folder (a single-file checkpoint is named by its "
                     ".safetensors file, not its folder)");
  }
  auto index = read_json_file(index_path, ExitCode::model);
  if (!index.is_object()) throw ModelError(index_path.string() + ": not a JSON object");
  pipeline_class_ = index.value("_class_name", "");
  for (const auto& [key, value] : index.items()) {
    if (key.starts_with("_") || !value.is_array())
      continue;  // _class_name, requires_safety_checker
    if (value.size() != 2)
      throw ModelError(index_path.string() + ": entry '" + key + "' is not [library, class]");
    if (value[0].is_null() || value[1].is_null()) continue;  // e.g. "safety_checker": [null, null]
    if (!value[0].is_string() || !value[1].is_string()) {
      throw ModelError(index_path.string() + ": entry '" + key + "' is not [library, class]");
    }
    Component component{key, value[0].get<std::string>(), value[1].get<std::string>(), root / key};
    if (!fs::is_directory(component.dir)) {
      throw ModelError(index_path.string() + " lists component '" + key + "' but " +
                       component.dir.string() + " is missing");
    }
    components_.push_back(std::move(component));
  }
  std::sort(components_.begin(), components_.end(),
            [](const Component& a, const Component& b) { return a.name < b.name; });
}

void ModelFolder::keep_weights_in_host_memory() {
  if (!host_weights_) host_weights_ = std::make_shared<HostWeights>();
}

ModelFolder::ModelFolder(const fs::path& config_root, SingleFileSource source)
    : ModelFolder(config_root) {
  single_file_ = std::move(source);
}

const Component* ModelFolder::find(const std::string& name) const {
  for (const auto& component : components_) {
    if (component.name == name) return &component;
  }
  return nullptr;
}

const Component& ModelFolder::require(const std::string& name) const {
  if (const Component* component = find(name)) return *component;
  throw ModelError((root_ / "model_index.json").string() + ": no '" + name +
                   "' component; a Stable Diffusion folder needs unet, vae, text_encoder, "
                   "tokenizer and scheduler");
}

fs::path ModelFolder::config_path(const std::string& name) const {
  const Component& component = require(name);
  for (const char* file : {"config.json", "scheduler_config.json", "tokenizer_config.json",
                           "preprocessor_config.json"}) {
    if (fs::exists(component.dir / file)) return component.dir / file;
  }
  throw ModelError(component.dir.string() +
                   ": no config.json (or scheduler_config.json, "
                   "tokenizer_config.json, preprocessor_config.json)");
}

nlohmann::json ModelFolder::config(const std::string& name) const {
  auto path = config_path(name);
  auto json = read_json_file(path, ExitCode::model);
  if (!json.is_object()) throw ModelError(path.string() + ": not a JSON object");
  return json;
}

WeightFiles ModelFolder::weights(const std::string& name, const std::string& variant) const {
  const Component& component = require(name);
  if (single_file_)
    throw std::logic_error("ModelFolder::weights(\"" + name + "\"): the weights of " +
                           single_file_->file.string() + " are read by models::from_single_file");
  // transformers models and SD 1.x's safety checker (library "stable_diffusion") use
  // transformers' file name.
  std::string base = component.library == "diffusers" ? "diffusion_pytorch_model" : "model";
  return find_weight_files(component.dir, base, variant);
}

}  // namespace sdtrain::io
