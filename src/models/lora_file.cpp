#include "sdtrain/models/lora_file.h"

#include <algorithm>
#include <cstring>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/describe.h"
#include "sdtrain/util/error.h"

namespace fs = std::filesystem;

namespace sdtrain::models {
namespace {

constexpr const char* kMetadataKey =
    "lora_adapter_metadata";                 // diffusers' LORA_ADAPTER_METADATA_KEY
constexpr std::size_t kMismatchesShown = 5;  // the first few say what is wrong

const std::map<std::string, std::string>& kohya_prefixes() {
  static const std::map<std::string, std::string> prefixes = {{"unet", "lora_unet"},
                                                              {"text_encoder", "lora_te"}};
  return prefixes;
}

// Collects what does not fit, and throws once with the first few.
class Mismatches {
 public:
  explicit Mismatches(fs::path path) : path_(std::move(path)) {}
  void add(std::string what) { items_.push_back(std::move(what)); }
  void throw_if_any(const std::string& hint) const {
    if (items_.empty()) return;
    throw ModelError(path_.string() + ": LoRA keys do not fit the base model" +
                     list_block("mismatches", items_, kMismatchesShown) + "\n" + hint);
  }

 private:
  fs::path path_;
  std::vector<std::string> items_;
};

// Layer path -> layer for every adapter-capable layer of a model.
std::map<std::string, LoRAHost*> capable_layers(torch::nn::Module& root) {
  std::map<std::string, LoRAHost*> layers;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    if (auto* host = dynamic_cast<LoRAHost*>(item.value().get())) layers[item.key()] = host;
  }
  return layers;
}

// A (and B) must fit the layer's weight: A [r, in, (kh, kw)], B [out, r, (1, 1)].
std::optional<std::string> misfit(LoRAHost* layer, const AdapterWeights& w) {
  const torch::Tensor& weight =
      dynamic_cast<torch::nn::Module*>(layer)->named_parameters(false)["weight"];
  const bool conv = weight.dim() == 4;
  std::vector<int64_t> a_shape = {w.A.size(0), weight.size(1)};
  std::vector<int64_t> b_shape = {weight.size(0), w.A.size(0)};
  if (conv) {
    a_shape.insert(a_shape.end(), {weight.size(2), weight.size(3)});
    b_shape.insert(b_shape.end(), {1, 1});
  }
  if (w.A.sizes() == c10::IntArrayRef(a_shape) && w.B.sizes() == c10::IntArrayRef(b_shape))
    return std::nullopt;
  return "lora_A " + describe_shape(w.A.sizes()) + ", lora_B " + describe_shape(w.B.sizes()) +
         " do not fit the layer's weight " + describe_shape(weight.sizes()) + " (expected " +
         describe_shape(a_shape) + " and " + describe_shape(b_shape) + ")";
}

// peft LoraConfig fields per component from the diffusers metadata ("unet.lora_alpha": 8).
std::map<std::string, double> diffusers_alphas(const std::map<std::string, std::string>& metadata,
                                               const fs::path& path) {
  std::map<std::string, double> alphas;
  auto found = metadata.find(kMetadataKey);
  if (found == metadata.end()) return alphas;
  const auto parsed = nlohmann::json::parse(found->second, nullptr, false);
  if (parsed.is_discarded() || !parsed.is_object())
    throw ModelError(path.string() + ": \"" + kMetadataKey + "\" in the metadata is not JSON");
  for (const auto& [key, value] : parsed.items()) {
    const auto dot = key.rfind('.');
    if (dot != std::string::npos && key.substr(dot + 1) == "lora_alpha" && value.is_number())
      alphas[key.substr(0, dot)] = value.get<double>();
  }
  return alphas;
}

// One half of an adapter found under `key`; both halves must arrive for each layer.
struct PartialAdapter {
  torch::Tensor A, B;
  std::optional<double> alpha;
};
using Found = std::map<std::string, std::map<std::string, PartialAdapter>>;  // component, layer

void read_diffusers_key(const std::string& key, const io::SafetensorsFile& file, Found& found,
                        Mismatches& mismatches) {
  const auto dot = key.find('.');
  const std::string component = key.substr(0, dot);
  for (const char* half : {".lora_A.weight", ".lora_B.weight"}) {
    if (dot == std::string::npos || !key.ends_with(half) || !kohya_prefixes().count(component))
      continue;
    const std::string layer = key.substr(dot + 1, key.size() - dot - 1 - std::strlen(half));
    (half[6] == 'A' ? found[component][layer].A : found[component][layer].B) = file.tensor(key);
    return;
  }
  mismatches.add(key + ": not a diffusers LoRA key (unet.<layer>.lora_A.weight, ...)");
}

void read_kohya_key(const std::string& key, const io::SafetensorsFile& file,
                    const std::map<std::string, std::pair<std::string, std::string>>& names,
                    Found& found, Mismatches& mismatches) {
  const auto dot = key.find('.');
  const std::string name = key.substr(0, dot),
                    suffix = dot == std::string::npos ? "" : key.substr(dot);
  auto layer = names.find(name);
  if (layer == names.end()) {
    mismatches.add(key + ": no adapter-capable layer of the model is named \"" + name + "\"");
    return;
  }
  PartialAdapter& adapter = found[layer->second.first][layer->second.second];
  if (suffix == ".lora_down.weight") {
    adapter.A = file.tensor(key);
  } else if (suffix == ".lora_up.weight") {
    adapter.B = file.tensor(key);
  } else if (suffix == ".alpha") {
    adapter.alpha = file.tensor(key).to(torch::kDouble).item<double>();
  } else {
    mismatches.add(key + ": not a kohya LoRA key (.lora_down.weight, .lora_up.weight, .alpha)");
  }
}

LoRALayout detect_layout(const io::SafetensorsFile& file) {
  for (const auto& entry : file.tensors()) {
    if (entry.name.starts_with("lora_unet_") || entry.name.starts_with("lora_te_") ||
        entry.name.starts_with("lora_te1_"))
      return LoRALayout::kohya;
    if (entry.name.find(".lora_A.") != std::string::npos) return LoRALayout::diffusers;
  }
  std::string first;
  for (std::size_t i = 0; i < std::min<std::size_t>(file.tensors().size(), 3); ++i)
    first += (i ? ", " : "") + file.tensors()[i].name;
  throw ModelError(
      file.path().string() +
      ": not a LoRA file in a layout sdtrain reads (diffusers: unet.<layer>.lora_A.weight; "
      "kohya: lora_unet_<layer>.lora_down.weight); its first keys: " +
      (first.empty() ? "(none)" : first));
}

}  // namespace

std::string to_string(LoRALayout layout) {
  return layout == LoRALayout::kohya ? "kohya" : "diffusers";
}

std::string kohya_lora_name(const std::string& component, const std::string& layer_path) {
  std::string name = kohya_prefixes().at(component) + "_" + layer_path;
  std::replace(name.begin() + static_cast<std::ptrdiff_t>(kohya_prefixes().at(component).size()),
               name.end(), '.', '_');
  return name;
}

LoRAFile read_lora_file(const fs::path& path, const AdapterModels& models) {
  std::optional<io::SafetensorsFile> opened;
  try {
    opened.emplace(path);
  } catch (const ModelError&) {
    throw;
  } catch (const std::exception& e) {
    throw ModelError(path.string() + ": cannot read the LoRA file: " + e.what());
  }
  const io::SafetensorsFile& file = *opened;
  LoRAFile lora{path, detect_layout(file), {}, file.metadata()};
  Mismatches mismatches(path);
  std::map<std::string, std::pair<std::string, std::string>> kohya_names;
  std::map<std::string, std::map<std::string, LoRAHost*>> layers;
  for (const auto& [component, module] : models) {
    layers[component] = capable_layers(*module);
    for (const auto& [layer, host] : layers[component]) {
      const std::string name = kohya_lora_name(component, layer);
      kohya_names[name] = {component, layer};
      // diffusers' convert_state_dict_to_kohya names the (first) text encoder "lora_te1_".
      if (component == "text_encoder")
        kohya_names["lora_te1_" + name.substr(kohya_prefixes().at(component).size() + 1)] = {
            component, layer};
    }
  }
  Found found;
  for (const auto& entry : file.tensors()) {
    if (lora.layout == LoRALayout::kohya)
      read_kohya_key(entry.name, file, kohya_names, found, mismatches);
    else
      read_diffusers_key(entry.name, file, found, mismatches);
  }
  const auto alphas = diffusers_alphas(lora.metadata, path);
  for (auto& [component, adapters] : found) {
    for (auto& [layer, partial] : adapters) {
      const std::string where = component + "." + layer;
      auto& component_layers = layers[component];  // empty for a component not in `models`
      auto host = component_layers.find(layer);
      if (host == component_layers.end()) {
        mismatches.add(where + ": the model has no adapter-capable layer of that name");
      } else if (!partial.A.defined() || !partial.B.defined()) {
        mismatches.add(where + ": has only one of its two matrices");
      } else {
        const double alpha = partial.alpha.value_or(alphas.count(component)
                                                        ? alphas.at(component)
                                                        : static_cast<double>(partial.A.size(0)));
        AdapterWeights weights{partial.A, partial.B, alpha};
        if (auto problem = misfit(host->second, weights)) mismatches.add(where + ": " + *problem);
        lora.components[component].emplace_back(layer, std::move(weights));
      }
    }
  }
  mismatches.throw_if_any(
      "Is it an adapter for another base model (an SD 1.5 adapter on SD 2.x, or the other way)?");
  return lora;
}

void attach_lora_file(const LoRAFile& file, const AdapterModels& models, double multiplier,
                      c10::ScalarType dtype) {
  torch::NoGradGuard no_grad;
  auto generator = at::make_generator<at::CPUGeneratorImpl>(0);  // overwritten below
  for (const auto& [component, adapters] : file.components) {
    auto layers = capable_layers(*models.at(component));
    for (const auto& [layer, weights] : adapters) {
      LoRAHost* host = layers.at(layer);
      if (host->has_adapter()) host->remove_adapter();
      host->attach_adapter({weights.A.size(0), weights.alpha, 0.0}, generator);
      for (auto* half : {&host->adapter_A(), &host->adapter_B()}) {
        torch::Tensor parameter = half->named_parameters()["weight"];
        const torch::Tensor& source = half == &host->adapter_A() ? weights.A : weights.B;
        parameter.set_data(source.to(parameter.device(), dtype).contiguous().clone());
      }
      host->set_adapter_multiplier(multiplier);
    }
  }
}

ComponentAdapters attached_adapter_weights(torch::nn::Module& root) {
  ComponentAdapters adapters;
  for (const auto& [name, host] : attached_adapters(root)) {
    adapters.emplace_back(name,
                          AdapterWeights{host->adapter_A().named_parameters()["weight"].detach(),
                                         host->adapter_B().named_parameters()["weight"].detach(),
                                         host->adapter_options().alpha});
  }
  return adapters;
}

namespace {

io::NamedTensors::value_type in_dtype(std::string key, const torch::Tensor& t,
                                      c10::ScalarType dtype) {
  return {std::move(key), t.detach().to(torch::kCPU, dtype).contiguous()};
}

}  // namespace

void write_diffusers_lora(const fs::path& path,
                          const std::map<std::string, ComponentAdapters>& adapters,
                          const LoRAWriteOptions& options) {
  io::NamedTensors tensors;
  for (const auto& [component, layers] : adapters) {
    for (const auto& [layer, weights] : layers) {
      tensors.push_back(
          in_dtype(component + "." + layer + ".lora_A.weight", weights.A, options.dtype));
      tensors.push_back(
          in_dtype(component + "." + layer + ".lora_B.weight", weights.B, options.dtype));
    }
  }
  // peft LoraConfig fields under "<component>.", as diffusers' save_lora_weights packs them, so
  // load_lora_weights rebuilds the same config (alpha included) instead of guessing alpha = r.
  nlohmann::json config = nlohmann::json::object();
  for (const auto& [component, c] : options.components) {
    config[component + ".r"] = c.rank;
    config[component + ".lora_alpha"] = c.alpha;
    config[component + ".lora_dropout"] = c.dropout;
    config[component + ".init_lora_weights"] = "gaussian";
    config[component + ".target_modules"] = c.targets;
  }
  std::map<std::string, std::string> metadata = options.metadata;
  metadata[kMetadataKey] = config.dump(2);
  io::save_safetensors(path, tensors, metadata);
}

void write_kohya_lora(const fs::path& path,
                      const std::map<std::string, ComponentAdapters>& adapters,
                      const LoRAWriteOptions& options) {
  io::NamedTensors tensors;
  for (const auto& [component, layers] : adapters) {
    for (const auto& [layer, weights] : layers) {
      const std::string name = kohya_lora_name(component, layer);
      tensors.push_back(in_dtype(name + ".lora_down.weight", weights.A, options.dtype));
      tensors.push_back(in_dtype(name + ".lora_up.weight", weights.B, options.dtype));
      tensors.push_back(in_dtype(name + ".alpha", torch::tensor(weights.alpha), options.dtype));
    }
  }
  // sd-scripts' own metadata names, which the WebUI shows for a LoRA.
  std::map<std::string, std::string> metadata = options.metadata;
  metadata["ss_network_module"] = "networks.lora";
  if (options.components.count("unet")) {
    const auto& unet = options.components.at("unet");
    std::ostringstream alpha;
    alpha << unet.alpha;
    metadata["ss_network_dim"] = std::to_string(unet.rank);
    metadata["ss_network_alpha"] = alpha.str();
  }
  io::save_safetensors(path, tensors, metadata);
}

}  // namespace sdtrain::models
