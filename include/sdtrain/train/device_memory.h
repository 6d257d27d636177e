#pragma once
// GPU memory figures for progress lines, metrics and benchmarks (0 on the CPU).

#include <torch/torch.h>

namespace sdtrain::train {

int64_t peak_device_memory_bytes(const torch::Device& device);
int64_t current_device_memory_bytes(const torch::Device& device);
void reset_peak_device_memory(const torch::Device& device);
// Free bytes on the GPU as the driver reports them (memory_budget "auto"); 0 on the CPU.
int64_t free_device_memory_bytes(const torch::Device& device);

}  // namespace sdtrain::train
