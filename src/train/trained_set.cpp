#include "sdtrain/train/trained_set.h"

#include <algorithm>
#include <stdexcept>

#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/models/lora_adapters.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/error.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

std::vector<std::string> trained_component_names(const TrainConfig& config) {
  // train_dreambooth.py trains the UNet always and the text encoder on request, and hands
  // the optimizer the UNet's parameters first (docs/training.md).
  std::vector<std::string> names = {"unet"};
  if (config.train_text_encoder) names.push_back("text_encoder");
  return names;
}

TrainedPart trained_part(const TrainConfig& config) {
  return config.lora.train_mode == TrainMode::lora ? TrainedPart::adapters : TrainedPart::weights;
}

TrainedSet::TrainedSet(const std::vector<PipelineModule>& modules,
                       const std::vector<std::string>& trained, TrainedPart part)
    : part_(part) {
  for (const auto& name : trained) {
    auto found = std::find_if(modules.begin(), modules.end(),
                              [&](const PipelineModule& m) { return m.name == name; });
    if (found == modules.end()) throw std::logic_error("TrainedSet: no module \"" + name + "\"");
    components_.push_back(*found);
  }
  for (const auto& m : modules) {
    m.module->train(trains(m.name));
    for (auto& parameter : m.module->parameters()) parameter.set_requires_grad(false);
  }
  for (auto& parameter : parameters()) parameter.set_requires_grad(true);
}

bool TrainedSet::trains(const std::string& name) const {
  return std::any_of(components_.begin(), components_.end(),
                     [&](const PipelineModule& m) { return m.name == name; });
}

io::NamedTensors TrainedSet::component_parameters(const std::string& name) const {
  io::NamedTensors named;
  for (const auto& component : components_) {
    if (component.name != name) continue;
    for (const auto& item : component.module->named_parameters()) {
      if (part_ == TrainedPart::weights || models::is_adapter_key(item.key()))
        named.emplace_back(item.key(), item.value());
    }
  }
  return named;
}

optim::NamedParameters TrainedSet::named_parameters() const {
  optim::NamedParameters named;
  for (const auto& component : components_) {
    for (const auto& [key, value] : component_parameters(component.name))
      named.emplace_back(component.name + "." + key, value);
  }
  return named;
}

std::vector<torch::Tensor> TrainedSet::parameters() const {
  std::vector<torch::Tensor> tensors;
  for (const auto& item : named_parameters()) tensors.push_back(item.second);
  return tensors;
}

std::vector<torch::Tensor> TrainedSet::gradients() const {
  std::vector<torch::Tensor> grads;
  for (const auto& parameter : parameters()) grads.push_back(parameter.grad());
  return grads;
}

int64_t TrainedSet::bytes() const {
  int64_t total = 0;
  for (const auto& parameter : parameters()) total += parameter.numel() * parameter.element_size();
  return total;
}

void TrainedSet::save(const fs::path& dir, const io::ModelFolder& base) const {
  if (part_ == TrainedPart::adapters) return save_adapters(dir / kLoRAWeightsFile);
  for (const auto& component : components_) {
    exporter::write_model_component(dir / component.name, base.config_path(component.name),
                                    models::state_dict(*component.module),
                                    component.weights_name + ".safetensors");
  }
}

void TrainedSet::load(const fs::path& dir, torch::Device device) {
  if (part_ == TrainedPart::adapters) return load_adapters(dir / kLoRAWeightsFile, device);
  for (auto& component : components_) {
    // In the dtype the run keeps them in: fp32, or bf16 in lean mode (saved exactly as fp32).
    const auto parameters = component.module->parameters();
    const models::LoadOptions options{
        parameters.empty() ? torch::kFloat : parameters.front().scalar_type(), device};
    models::load_state_dict(*component.module,
                            io::find_weight_files(dir / component.name, component.weights_name),
                            options, component.map_key);
  }
}

std::map<std::string, io::NamedTensors> TrainedSet::weights() const {
  std::map<std::string, io::NamedTensors> trained;
  for (const auto& component : components_) {
    trained[component.name] = models::state_dict(*component.module);
  }
  return trained;
}

// The diffusers LoRA layout ("unet.<layer>.lora_A.weight"): named_parameters() exactly.
void TrainedSet::save_adapters(const fs::path& file) const {
  io::save_safetensors(file, named_parameters());
}

void TrainedSet::load_adapters(const fs::path& file, torch::Device device) {
  if (!fs::exists(file))
    throw ModelError(file.string() + ": missing; the checkpoint is incomplete");
  const io::SafetensorsFile saved(file);
  const optim::NamedParameters expected = named_parameters();
  if (saved.tensors().size() != expected.size()) {
    throw ModelError(file.string() + ": holds " + std::to_string(saved.tensors().size()) +
                     " adapter tensors, the run trains " + std::to_string(expected.size()) +
                     " (were lora_unet_targets, lora_rank or train_text_encoder changed?)");
  }
  torch::NoGradGuard no_grad;
  for (const auto& [name, parameter] : expected) {
    const io::TensorEntry* entry = saved.find(name);
    if (!entry || c10::IntArrayRef(entry->shape) != parameter.sizes()) {
      throw ModelError(file.string() + ": \"" + name + "\" is " +
                       (entry ? "of another shape" : "missing") + " (the run's adapters differ)");
    }
    parameter.set_data(
        models::in_layout_of(saved.tensor(name).to(device, torch::kFloat).clone(), parameter));
  }
}

}  // namespace sdtrain::train
