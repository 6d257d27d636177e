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

}  // namespace

int64_t peak_device_memory_bytes(const torch::Device& device) {
  if (!device.is_cuda()) return 0;
  return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index())
      .allocated_bytes[kAggregate]
      .peak;
}

int64_t peak_reserved_device_memory_bytes(const torch::Device& device) {
  if (!device.is_cuda()) return 0;
  return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index())
      .reserved_bytes[kAggregate]
      .peak;
}

int64_t current_device_memory_bytes(const torch::Device& device) {
  if (!device.is_cuda()) return 0;
  return c10::cuda::CUDACachingAllocator::getDeviceStats(device.index() < 0 ? 0 : device.index())
      .allocated_bytes[kAggregate]
      .current;
}

void reset_peak_device_memory(const torch::Device& device) {
  if (device.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(device.index() < 0 ? 0 : device.index());
}

int64_t free_device_memory_bytes(const torch::Device& device) {
  if (!device.is_cuda()) return 0;
  const c10::cuda::CUDAGuard guard(device.index() < 0 ? 0 : device.index());
  size_t free = 0;
  size_t total = 0;
  if (cudaMemGetInfo(&free, &total) != cudaSuccess) return 0;
  return static_cast<int64_t>(free);
}

#else
int64_t free_device_memory_bytes(const torch::Device&) { return 0; }
int64_t peak_device_memory_bytes(const torch::Device&) { return 0; }
int64_t peak_reserved_device_memory_bytes(const torch::Device&) { return 0; }
int64_t current_device_memory_bytes(const torch::Device&) { return 0; }
void reset_peak_device_memory(const torch::Device&) {}
#endif

}  // namespace sdtrain::train
