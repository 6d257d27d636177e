#pragma once
// GPU memory figures for progress lines, metrics and benchmarks (0 on the CPU), and the wait
// that makes a start-up phase's logged time its own.

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
// Waits until the work queued on `device` is done; nothing to wait for on the CPU. For timed
// phases outside the training step (the load, latent caching), never inside it.
void synchronize_device(const torch::Device& device);

}  // namespace sdtrain::train
