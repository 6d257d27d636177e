#include "sdtrain/train/trained_set.h"

#include <algorithm>
#include <stdexcept>

#include "sdtrain/export/diffusers_folder.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

std::vector<std::string> trained_component_names(const TrainConfig& config) {
  // train_dreambooth.py trains the UNet always and the text encoder on request, and hands
  // the optimizer the UNet's parameters first (docs/training.md).
  std::vector<std::string> names = {"unet"};
  if (config.train_text_encoder) names.push_back("text_encoder");
  return names;
}

TrainedSet::TrainedSet(const std::vector<PipelineModule>& modules,
                       const std::vector<std::string>& trained) {
  for (const auto& name : trained) {
    auto found = std::find_if(modules.begin(), modules.end(),
                              [&](const PipelineModule& m) { return m.name == name; });
    if (found == modules.end()) throw std::logic_error("TrainedSet: no module \"" + name + "\"");
    components_.push_back(*found);
  }
  for (const auto& m : modules) {
    const bool train = trains(m.name);
    m.module->train(train);
    for (auto& parameter : m.module->parameters()) parameter.set_requires_grad(train);
  }
}

bool TrainedSet::trains(const std::string& name) const {
  return std::any_of(components_.begin(), components_.end(),
                     [&](const PipelineModule& m) { return m.name == name; });
}

optim::NamedParameters TrainedSet::named_parameters() const {
  optim::NamedParameters named;
  for (const auto& component : components_) {
    for (const auto& item : component.module->named_parameters()) {
      named.emplace_back(component.name + "." + item.key(), item.value());
    }
  }
  return named;
}

std::vector<torch::Tensor> TrainedSet::parameters() const {
  std::vector<torch::Tensor> tensors;
  for (const auto& component : components_) {
    for (const auto& parameter : component.module->parameters()) tensors.push_back(parameter);
  }
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
  for (const auto& component : components_) {
    exporter::write_model_component(dir / component.name, base.config_path(component.name),
                                    models::state_dict(*component.module),
                                    component.weights_name + ".safetensors");
  }
}

void TrainedSet::load(const fs::path& dir, torch::Device device) {
  const models::LoadOptions fp32{torch::kFloat, device};
  for (auto& component : components_) {
    models::load_state_dict(*component.module,
                            io::find_weight_files(dir / component.name, component.weights_name),
                            fp32, component.map_key);
  }
}

std::map<std::string, io::NamedTensors> TrainedSet::weights() const {
  std::map<std::string, io::NamedTensors> trained;
  for (const auto& component : components_) {
    trained[component.name] = models::state_dict(*component.module);
  }
  return trained;
}

}  // namespace sdtrain::train
