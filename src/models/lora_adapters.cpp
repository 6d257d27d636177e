#include "sdtrain/models/lora_adapters.h"

#include <algorithm>
#include <stdexcept>

namespace sdtrain::models {
namespace {

// B·A as a weight of the base layer's shape: [out, r]·[r, in] for a Linear; for a Conv2d,
// B is [out, r, 1, 1] and A [r, in, kh, kw], so each output channel mixes A's kernels.
torch::Tensor adapter_delta(torch::nn::Module& a, torch::nn::Module& b) {
  const torch::Tensor wa = a.named_parameters()["weight"].to(torch::kFloat);
  const torch::Tensor wb = b.named_parameters()["weight"].to(torch::kFloat);
  if (wa.dim() == 2) return torch::matmul(wb, wa);
  const torch::Tensor flat = torch::matmul(wb.flatten(1), wa.flatten(1));  // [out, in*kh*kw]
  return flat.reshape({wb.size(0), wa.size(1), wa.size(2), wa.size(3)});
}

}  // namespace

bool is_targeted(const std::string& path, const std::vector<std::string>& targets) {
  return std::any_of(targets.begin(), targets.end(), [&](const std::string& target) {
    return path == target || (path.size() > target.size() && path.ends_with(target) &&
                              path[path.size() - target.size() - 1] == '.');
  });
}

const std::vector<std::string>& unet_adapter_target_names() {
  static const std::vector<std::string> names = {"to_q",
                                                 "to_k",
                                                 "to_v",
                                                 "to_out.0",
                                                 "ff.net.0.proj",
                                                 "ff.net.2",
                                                 "proj_in",
                                                 "proj_out",
                                                 "conv1",
                                                 "conv2",
                                                 "conv_shortcut",
                                                 "time_emb_proj",
                                                 "downsamplers.0.conv",
                                                 "upsamplers.0.conv"};
  return names;
}

const std::vector<std::string>& default_unet_adapter_targets() {
  static const std::vector<std::string> names = {"to_q", "to_k", "to_v", "to_out.0"};
  return names;
}

const std::vector<std::string>& text_encoder_adapter_targets() {
  static const std::vector<std::string> names = {"q_proj", "k_proj", "v_proj", "out_proj"};
  return names;
}

AdapterLayers adapter_layers(torch::nn::Module& root, const std::vector<std::string>& targets) {
  AdapterLayers layers;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    auto* host = dynamic_cast<LoRAHost*>(item.value().get());
    if (!host) continue;
    if (is_targeted(item.key(), targets)) layers.emplace_back(item.key(), host);
  }
  return layers;
}

AdapterLayers attached_adapters(torch::nn::Module& root) {
  AdapterLayers layers;
  for (const auto& item : root.named_modules("", /*include_self=*/false)) {
    auto* host = dynamic_cast<LoRAHost*>(item.value().get());
    if (host && host->has_adapter()) layers.emplace_back(item.key(), host);
  }
  return layers;
}

int64_t attach_adapters(torch::nn::Module& root, const std::vector<std::string>& targets,
                        const LoRAOptions& options, at::Generator generator) {
  for (const auto& target : targets) {
    if (adapter_layers(root, {target}).empty())
      throw std::invalid_argument("no layer of the model is named \"" + target + "\"");
  }
  const AdapterLayers layers = adapter_layers(root, targets);
  for (const auto& [name, layer] : layers) layer->attach_adapter(options, generator);
  return static_cast<int64_t>(layers.size());
}

void remove_adapters(torch::nn::Module& root) {
  for (const auto& [name, layer] : attached_adapters(root)) layer->remove_adapter();
}

void set_adapter_multiplier(torch::nn::Module& root, double multiplier) {
  for (const auto& [name, layer] : attached_adapters(root))
    layer->set_adapter_multiplier(multiplier);
}

bool is_adapter_key(const std::string& key) {
  return key.find(".lora_A.") != std::string::npos || key.find(".lora_B.") != std::string::npos ||
         key.starts_with("lora_A.") || key.starts_with("lora_B.");
}

io::NamedTensors adapter_parameters(torch::nn::Module& root) {
  io::NamedTensors named;
  for (const auto& item : root.named_parameters(/*recurse=*/true)) {
    if (is_adapter_key(item.key())) named.emplace_back(item.key(), item.value());
  }
  return named;
}

void merge_adapters(torch::nn::Module& root) {
  torch::NoGradGuard no_grad;
  for (const auto& [name, layer] : attached_adapters(root)) {
    torch::Tensor weight =
        dynamic_cast<torch::nn::Module*>(layer)->named_parameters(false)["weight"];
    const torch::Tensor delta = adapter_delta(layer->adapter_A(), layer->adapter_B());
    weight.copy_(
        (weight.to(torch::kFloat) + delta * layer->adapter_scale()).to(weight.scalar_type()));
    layer->remove_adapter();
  }
}

}  // namespace sdtrain::models
