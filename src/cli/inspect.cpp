#include "sdtrain/cli/inspect.h"

#include <map>
#include <sstream>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/io/checkpoint_kind.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::cli {
namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

namespace {

// Config keys worth a glance for each component class; the full config is in --json.
const std::map<std::string, std::vector<std::string>>& summary_keys() {
  static const std::map<std::string, std::vector<std::string>> keys = {
      {"UNet2DConditionModel",
       {"block_out_channels", "attention_head_dim", "cross_attention_dim", "use_linear_projection",
        "upcast_attention", "sample_size", "in_channels"}},
      {"AutoencoderKL", {"block_out_channels", "latent_channels", "scaling_factor", "sample_size"}},
      {"CLIPTextModel",
       {"hidden_size", "num_hidden_layers", "num_attention_heads", "hidden_act", "vocab_size"}},
      {"CLIPTokenizer", {"model_max_length", "pad_token", "do_lower_case"}},
      {"scheduler",
       {"prediction_type", "beta_schedule", "beta_start", "beta_end", "timestep_spacing",
        "steps_offset", "num_train_timesteps"}},
  };
  return keys;
}

ojson summarize_tensors(const std::vector<io::SafetensorsHeader>& headers) {
  int64_t count = 0, parameters = 0;
  uint64_t bytes = 0;
  std::map<std::string, int64_t> dtypes;
  for (const auto& header : headers) {
    for (const auto& tensor : header.tensors) {
      ++count;
      parameters += tensor.numel();
      bytes += tensor.end - tensor.begin;
      ++dtypes[std::string(io::dtype_name(tensor.dtype))];
    }
  }
  ojson dtype_counts = ojson::object();
  for (const auto& [dtype, n] : dtypes) dtype_counts[dtype] = n;
  return {
      {"tensors", count}, {"parameters", parameters}, {"bytes", bytes}, {"dtypes", dtype_counts}};
}

ojson config_summary(const std::string& class_name, const nlohmann::json& config);

// What sdtrain builds from an SD single file (the configs of models/single_file_config.h),
// or why it cannot.
ojson single_file_builds(const fs::path& path) {
  try {
    const io::ModelFolder base = models::open_base_model(path);
    ojson builds = ojson::object();
    for (const auto& component : base.components())
      builds[component.name] = config_summary(
          component.name == "scheduler" ? "scheduler" : component.class_name, base.config(component.name));
    builds["notes"] = base.single_file()->notes;
    return builds;
  } catch (const ModelError& error) {
    return {{"error", error.what()}};
  }
}

ojson inspect_file(const fs::path& path) {
  auto header = io::read_safetensors_header(path);
  ojson result = {{"kind", "safetensors"}, {"path", path.string()}};
  result.update(summarize_tensors({header}));
  ojson metadata = ojson::object();
  for (const auto& [key, value] : header.metadata) metadata[key] = value;
  result["metadata"] = metadata;
  const io::CheckpointDetection detected = io::detect_checkpoint(header);
  result["detected"] = detected.description;
  if (detected.kind == io::CheckpointKind::sd1_single_file ||
      detected.kind == io::CheckpointKind::sd2_single_file)
    result["builds"] = single_file_builds(path);
  return result;
}

ojson config_summary(const std::string& class_name, const nlohmann::json& config) {
  ojson summary = ojson::object();
  auto keys = summary_keys().find(class_name);
  if (keys == summary_keys().end() && class_name.find("Scheduler") != std::string::npos) {
    keys = summary_keys().find("scheduler");
  }
  if (keys == summary_keys().end()) return summary;
  for (const auto& key : keys->second) {
    if (config.contains(key)) summary[key] = config[key];
  }
  return summary;
}

ojson inspect_component(const io::ModelFolder& folder, const io::Component& component) {
  ojson result = {
      {"name", component.name}, {"library", component.library}, {"class", component.class_name}};
  auto config = folder.config(component.name);
  result["config_file"] = folder.config_path(component.name).filename().string();
  result["config"] = config_summary(component.class_name, config);
  if (component.name == "tokenizer") {
    // transformers lets special_tokens_map.json override tokenizer_config.json: SD 2.x pads
    // with "!" although its tokenizer_config.json says <|endoftext|>.
    fs::path special = component.dir / "special_tokens_map.json";
    if (fs::exists(special)) {
      auto map = read_json_file(special, ExitCode::model);
      if (map.contains("pad_token")) {
        const auto& pad = map["pad_token"];
        result["config"]["pad_token"] =
            pad.is_object() ? nlohmann::json(pad.value("content", "")) : pad;
      }
    }
    fs::path vocab = component.dir / "vocab.json";
    if (fs::exists(vocab)) result["vocab_size"] = read_json_file(vocab, ExitCode::model).size();
    return result;
  }
  bool has_weights = component.class_name.find("Scheduler") == std::string::npos &&
                     component.name != "feature_extractor";
  if (has_weights) {
    auto weights = folder.weights(component.name);
    ojson files = ojson::array();
    for (const auto& file : weights.files) files.push_back(file.filename().string());
    result["weight_files"] = files;
    result.update(summarize_tensors(io::read_weight_headers(weights)));
  }
  return result;
}

ojson inspect_folder(const fs::path& path) {
  io::ModelFolder folder(path);
  ojson result = {
      {"kind", "model_folder"}, {"path", path.string()}, {"pipeline", folder.pipeline_class()}};
  ojson components = ojson::array();
  int64_t total = 0;
  for (const auto& component : folder.components()) {
    components.push_back(inspect_component(folder, component));
    total += components.back().value("parameters", int64_t{0});
  }
  result["components"] = components;
  result["parameters"] = total;
  return result;
}

std::string with_thousands(int64_t value) {
  const std::string digits = std::to_string(value);
  std::string grouped;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    std::size_t remaining = digits.size() - i;
    if (i > 0 && digits[i - 1] != '-' && remaining % 3 == 0) grouped += ',';
    grouped += digits[i];
  }
  return grouped;
}

void format_tensors(std::ostringstream& out, const ojson& item, const std::string& indent) {
  out << indent << "tensors: " << item["tensors"].get<int64_t>()
      << ", parameters: " << with_thousands(item["parameters"].get<int64_t>()) << ", "
      << (item["bytes"].get<uint64_t>() / (1 << 20)) << " MiB, dtypes:";
  for (const auto& [dtype, n] : item["dtypes"].items())
    out << " " << dtype << "=" << n.get<int64_t>();
  out << "\n";
}

void format_builds(std::ostringstream& out, const ojson& builds) {
  if (builds.contains("error")) {
    out << "  cannot build: " << builds["error"].get<std::string>() << "\n";
    return;
  }
  out << "  builds (as a base model):\n";
  for (const auto& [name, config] : builds.items())
    if (name != "notes") out << "    " << name << ": " << config.dump() << "\n";
  for (const auto& note : builds["notes"]) out << "    note: " << note.get<std::string>() << "\n";
}

}  // namespace

ojson inspect(const fs::path& path) {
  if (!fs::exists(path)) throw ModelError(path.string() + ": no such file or folder");
  if (fs::is_regular_file(path)) return inspect_file(path);
  if (fs::exists(path / "model_index.json")) return inspect_folder(path);
  if (fs::exists(path / "config.json")) {
    // A single component folder (e.g. checkpoint-400/unet): inspect it as a one-component model.
    auto config = read_json_file(path / "config.json", ExitCode::model);
    std::string class_name = config.value("_class_name", "");
    if (class_name.empty() && config.contains("architectures") &&
        config["architectures"].is_array() && !config["architectures"].empty()) {
      class_name = config["architectures"][0].get<std::string>();
    }
    std::string base = config.contains("_class_name") ? "diffusion_pytorch_model" : "model";
    auto weights = io::find_weight_files(path, base);
    ojson result = {{"kind", "component_folder"},
                    {"path", path.string()},
                    {"class", class_name},
                    {"config", config_summary(class_name, config)}};
    result.update(summarize_tensors(io::read_weight_headers(weights)));
    return result;
  }
  throw ModelError(path.string() +
                   ": not a .safetensors file, a diffusers model folder (model_index.json) "
                   "or a component folder (config.json)");
}

std::string format_inspection(const ojson& item) {
  std::ostringstream out;
  const std::string kind = item["kind"];
  out << item["path"].get<std::string>() << "\n";
  if (kind == "safetensors") {
    out << "  detected: " << item["detected"].get<std::string>() << "\n";
    format_tensors(out, item, "  ");
    for (const auto& [key, value] : item["metadata"].items())
      out << "  metadata " << key << ": " << value.get<std::string>() << "\n";
    if (item.contains("builds")) format_builds(out, item["builds"]);
    return out.str();
  }
  if (kind == "component_folder") {
    out << "  " << item["class"].get<std::string>() << " " << item["config"].dump() << "\n";
    format_tensors(out, item, "  ");
    return out.str();
  }
  out << "  pipeline: " << item["pipeline"].get<std::string>() << "\n";
  for (const auto& component : item["components"]) {
    out << "  " << component["name"].get<std::string>() << " ("
        << component["class"].get<std::string>() << ")\n";
    if (!component["config"].empty()) out << "    config: " << component["config"].dump() << "\n";
    if (component.contains("vocab_size"))
      out << "    vocabulary: " << component["vocab_size"].get<int64_t>() << " tokens\n";
    if (component.contains("tensors")) format_tensors(out, component, "    ");
  }
  out << "  total parameters: " << with_thousands(item["parameters"].get<int64_t>()) << "\n";
  return out.str();
}

}  // namespace sdtrain::cli
