#pragma once
// Tensors grouped as ATen's multi-tensor (foreach) kernels take them: one list per device and
// dtype, as torch's _group_tensors_by_device_and_dtype gives them to GradScaler and
// clip_grad_norm_. Groups come in the order they first appear, each in the tensors' order;
// undefined tensors (parameters without a gradient) are left out.

#include <torch/torch.h>

#include <utility>
#include <vector>

namespace sdtrain::train {

inline std::vector<std::vector<torch::Tensor>> group_by_device_and_dtype(
    const std::vector<torch::Tensor>& tensors) {
  std::vector<std::pair<torch::Device, c10::ScalarType>> keys;
  std::vector<std::vector<torch::Tensor>> groups;
  for (const auto& tensor : tensors) {
    if (!tensor.defined()) continue;
    const std::pair<torch::Device, c10::ScalarType> key{tensor.device(), tensor.scalar_type()};
    size_t group = 0;
    while (group < keys.size() && keys[group] != key) ++group;
    if (group == keys.size()) {
      keys.push_back(key);
      groups.emplace_back();
    }
    groups[group].push_back(tensor);
  }
  return groups;
}

}  // namespace sdtrain::train
