#pragma once
// GPU memory figures for progress lines, metrics and benchmarks (0 on the CPU).

#include <torch/torch.h>

namespace sdtrain::train {

// Peaks since the last reset: of the bytes allocated to tensors, and of the bytes the caching
// allocator reserves from the driver. A CUDA graph's memory pool stays reserved between replays
// although its tensors are freed (micro_batch_pass.h), so captured and eager runs compare by
// what they reserve; allocated bytes compare with diffusers' torch.cuda.max_memory_allocated.
int64_t peak_device_memory_bytes(const torch::Device& device);
int64_t peak_reserved_device_memory_bytes(const torch::Device& device);
int64_t current_device_memory_bytes(const torch::Device& device);
void reset_peak_device_memory(const torch::Device& device);
// Free bytes on the GPU as the driver reports them (memory_budget "auto"); 0 on the CPU.
int64_t free_device_memory_bytes(const torch::Device& device);

}  // namespace sdtrain::train
