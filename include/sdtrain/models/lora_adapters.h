#pragma once
// The LoRA adapters of a whole model: which layers carry one, attaching them as a run or a file
// asks, their weights under diffusers' keys, scaling, removing and folding them into the base.
// Each layer's adapter is a typed member (lora.h); these functions walk the module tree to find
// the layers, so a key "<layer path>.lora_A.weight" is always the module's own state-dict key.

#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/lora.h"

namespace sdtrain::models {

using AdapterLayers = std::vector<std::pair<std::string, LoRAHost*>>;

// The layer names a run may target in the UNet, as diffusers' and kohya's module names:
// attention projections, feed-forward, the transformer's projections, resnet and
// down/up-sampling convolutions. diffusers' train_dreambooth_lora.py trains the first four.
const std::vector<std::string>& unet_adapter_target_names();
const std::vector<std::string>& default_unet_adapter_targets();
// The text encoder's: diffusers trains the attention projections (kohya also fc1/fc2).
const std::vector<std::string>& text_encoder_adapter_targets();

// True when `path` is one of `targets` or ends with "." + target (peft's target_modules rule).
bool is_targeted(const std::string& path, const std::vector<std::string>& targets);
// Every adapter-capable layer under `root` that is_targeted, in named_modules order.
AdapterLayers adapter_layers(torch::nn::Module& root, const std::vector<std::string>& targets);
// Every layer under `root` that carries an adapter, in named_modules order.
AdapterLayers attached_adapters(torch::nn::Module& root);

// Attaches a freshly initialised adapter (lora.h) to each targeted layer, drawing their A
// matrices from `generator` in named_modules order. Returns the number attached; a target that
// names no layer of `root` is a std::invalid_argument naming it.
int64_t attach_adapters(torch::nn::Module& root, const std::vector<std::string>& targets,
                        const LoRAOptions& options, at::Generator generator);
void remove_adapters(torch::nn::Module& root);
void set_adapter_multiplier(torch::nn::Module& root, double multiplier);

// "<layer>.lora_A.weight" / "<layer>.lora_B.weight" of every adapter, the tensors themselves.
io::NamedTensors adapter_parameters(torch::nn::Module& root);
bool is_adapter_key(const std::string& key);

// Folds each adapter into its layer's weight (W += alpha/r · m · B·A, per output channel for a
// convolution) in float32, and removes it: the model then computes what base + adapter did.
void merge_adapters(torch::nn::Module& root);

}  // namespace sdtrain::models
