#include "sdtrain/train/device_memory.h"

#ifdef SDTRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime_api.h>
#endif

namespace sdtrain::train {

#ifdef SDTRAIN_WITH_CUDA
namespace {

constexpr int kAggregate = 0;  // StatType::AGGREGATE: all pools

// The index of a CUDA device; 0 for "cuda" without one.
c10::DeviceIndex index_of(const torch::Device& device) {
  return device.index() < 0 ? 0 : device.index();
}

c10::CachingDeviceAllocator::DeviceStats stats_of(const torch::Device& device) {
  return c10::cuda::CUDACachingAllocator::getDeviceStats(index_of(device));
}

}  // namespace

int64_t peak_device_memory_bytes(const torch::Device& device) {
  return device.is_cuda() ? stats_of(device).allocated_bytes[kAggregate].peak : 0;
}

int64_t peak_reserved_device_memory_bytes(const torch::Device& device) {
  return device.is_cuda() ? stats_of(device).reserved_bytes[kAggregate].peak : 0;
}

int64_t current_device_memory_bytes(const torch::Device& device) {
  return device.is_cuda() ? stats_of(device).allocated_bytes[kAggregate].current : 0;
}

void reset_peak_device_memory(const torch::Device& device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(index_of(device));
}

int64_t free_device_memory_bytes(const torch::Device& device) {
  if (!device.is_cuda()) return 0;
  const c10::cuda::CUDAGuard guard(index_of(device));
  size_t free = 0;
  size_t total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
  return static_cast<int64_t>(free);
}

void synchronize_device(const torch::Device& device) {
  if (device.is_cuda()) torch::cuda::synchronize(index_of(device));
}

#else
void synchronize_device(const torch::Device&) {}
int64_t free_device_memory_bytes(const torch::Device&) { return 0; }
int64_t peak_device_memory_bytes(const torch::Device&) { return 0; }
int64_t peak_reserved_device_memory_bytes(const torch::Device&) { return 0; }
int64_t current_device_memory_bytes(const torch::Device&) { return 0; }
void reset_peak_device_memory(const torch::Device&) {}
#endif

}  // namespace sdtrain::train
