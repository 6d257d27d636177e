#pragma once
// GPU memory figures for progress lines, metrics and benchmarks (0 on the CPU), and handing
// cached blocks back after class-image generation so training starts from a clean pool.

#include <torch/torch.h>

namespace sdtrain::train {

int64_t peak_device_memory_bytes(const torch::Device& device);
int64_t current_device_memory_bytes(const torch::Device& device);
void reset_peak_device_memory(const torch::Device& device);
void release_cached_device_memory(const torch::Device& device);

}  // namespace sdtrain::train
