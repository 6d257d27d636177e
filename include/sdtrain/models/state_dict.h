#pragma once
// Loading and saving a module's weights as diffusers/transformers safetensors. Module members
// mirror the reference module trees, so named_parameters() yields the checkpoint keys
// directly; a KeyMapper covers only legacy spellings (e.g. the VAE's query/key/value).

#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/staged_copy.h"

namespace sdtrain::models {

// Maps a checkpoint key to the module key; std::nullopt skips the tensor (e.g. the legacy
// text_model.embeddings.position_ids buffer).
using KeyMapper = std::function<std::optional<std::string>(const std::string&)>;

struct LoadOptions {
  LoadOptions() = default;
  LoadOptions(c10::ScalarType dtype, torch::Device device) : dtype(dtype), device(device) {}

  c10::ScalarType dtype = torch::kFloat;
  torch::Device device = torch::kCPU;
  // Whether tensors reach the device through a staging ring (staged_copy.h); unset, as
  // staged_by_default(device) says: on CUDA.
  std::optional<bool> staged;
  Staging staging;
};

// Strict load: every parameter and buffer of `module` must be in `weights` with its exact
// shape and a floating dtype where the module is floating, and nothing else may be there.
// All problems are collected first and reported in one ModelError listing the tensors (and
// the file); nothing is modified unless the check passes. Each tensor is copied straight from
// the memory-mapped file to options.device/dtype (on CUDA through the staging ring, which
// overlaps reading the file with the transfer: staged_copy.h), so the weights are never held
// twice in host memory. A tensor keeps its layout (a channels-last weight stays
// channels-last: to_channels_last).
void load_state_dict(torch::nn::Module& module, const io::WeightFiles& weights,
                     const LoadOptions& options, const KeyMapper& map_key = {});

// `tensors` (one per parameter and buffer of `module`, by key, with its shape: what
// from_single_file returns for the module's own state dict) into the module, each copied to
// options.device/dtype (floating tensors). A missing or extra key is a logic error.
void assign_state_dict(torch::nn::Module& module, const io::NamedTensors& tensors,
                       const LoadOptions& options);

// The module's parameters and buffers, by key, optionally cast to `dtype`.
std::vector<std::pair<std::string, torch::Tensor>> state_dict(
    const torch::nn::Module& module, std::optional<c10::ScalarType> dtype = std::nullopt);

int64_t parameter_count(const torch::nn::Module& module);

// Stores every 4-D parameter and buffer of `module` (the convolution weights) channels-last
// (NHWC), the layout cuDNN computes convolutions in (compute.channels_last,
// docs/performance.md); returns how many. Loads into the module keep that layout, and the
// optimizers step each tensor in its own storage order (optim::gradient_in_parameter_layout).
int64_t to_channels_last(torch::nn::Module& module);

// A 4-D tensor stored channels-last and not also contiguous (so not one whose sizes make the
// two layouts the same storage order).
bool is_channels_last(const torch::Tensor& tensor);

// `value` in the layout of `target`: channels-last where target is, as it is otherwise.
torch::Tensor in_layout_of(const torch::Tensor& value, const torch::Tensor& target);

}  // namespace sdtrain::models
