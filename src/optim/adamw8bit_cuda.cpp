// Host side of the 8-bit AdamW CUDA kernels: checks, grouping by (device, dtype), the
// multi-tensor argument table, and the launches on the current stream.
#include "adamw8bit_cuda.h"

#if SDTRAIN_WITH_CUDA

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <tuple>

#include "sdtrain/optim/adamw8bit_kernels.h"
#include "sdtrain/optim/blockwise_quantization.h"
#include "sdtrain/util/cuda_launch.h"

namespace sdtrain::optim::detail {
using ::sdtrain::cuda::check_launch;
using ::sdtrain::cuda::cuda_element_type;

namespace {

bool aligned(const void* pointer, size_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

void check_update(const CudaParameterUpdate& u) {
  TORCH_CHECK(u.param.is_cuda() && u.grad.is_cuda() && u.param.device() == u.grad.device(),
              "adamw8bit (CUDA): parameter and gradient must be on the same CUDA device, got ",
              u.param.device(), " and ", u.grad.device());
  TORCH_CHECK(u.param.scalar_type() == u.grad.scalar_type(), "adamw8bit (CUDA): gradient is ",
              u.grad.scalar_type(), ", parameter is ", u.param.scalar_type());
  // The kernels walk both storages in the same order (gradient_in_parameter_layout).
  TORCH_CHECK(u.param.is_non_overlapping_and_dense() && u.grad.strides() == u.param.strides(),
              "adamw8bit (CUDA): parameter and gradient must be dense, with the same strides");
  TORCH_CHECK(u.param.numel() == u.grad.numel(), "adamw8bit (CUDA): gradient has ",
              u.grad.numel(), " elements, parameter ", u.param.numel());
  const int64_t n = u.param.numel();
  const auto state_type = u.quantized ? torch::kUInt8 : torch::kFloat32;
  for (const torch::Tensor* s : {&u.state1, &u.state2}) {
    TORCH_CHECK(s->device() == u.param.device() && s->scalar_type() == state_type &&
                    s->numel() == n && s->is_contiguous(),
                "adamw8bit (CUDA): state must be contiguous ", state_type, " [", n, "] on ",
                u.param.device(), ", got ", s->scalar_type(), " ", s->sizes(), " on ",
                s->device());
  }
  if (u.quantized) {
    for (const torch::Tensor* s : {&u.absmax1, &u.absmax2}) {
      TORCH_CHECK(s->device() == u.param.device() && s->scalar_type() == torch::kFloat32 &&
                      s->numel() == num_quantization_blocks(n) && s->is_contiguous(),
                  "adamw8bit (CUDA): absmax must be contiguous float32 [",
                  num_quantization_blocks(n), "] on ", u.param.device());
    }
  }
}

// Copies a host array of trivially copyable structs to `device` through pinned memory,
// asynchronously on the current stream; the caching host allocator keeps the pinned block
// until the copy has run, and the device block is reused only in stream order.
template <typename Args>
torch::Tensor to_device_table(const std::vector<Args>& host, const torch::Device& device) {
  const int64_t bytes = static_cast<int64_t>(host.size() * sizeof(Args));
  torch::Tensor pinned = torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8)
                                                   .pinned_memory(true));
  std::memcpy(pinned.data_ptr(), host.data(), bytes);
  return pinned.to(device, /*non_blocking=*/true);
}

// Places a launch's host table in the captured table, 16-byte aligned, and records where each
// tensor's per-step fields are; returns the device address the captured launch reads it from.
template <typename Args>
const Args* place_captured(CapturedArguments& capture, const std::vector<Args>& host,
                           const std::vector<size_t>& indices) {
  const size_t at = (capture.used + 15) / 16 * 16;
  const size_t bytes = host.size() * sizeof(Args);
  TORCH_CHECK(at + bytes <= capture.table.size(),
              "adamw8bit (CUDA): the captured argument table is full");
  std::memcpy(capture.table.data() + at, host.data(), bytes);
  for (size_t k = 0; k < host.size(); ++k) {
    const size_t entry = at + k * sizeof(Args);
    capture.arguments.push_back({indices[k], entry + offsetof(Args, constants),
                                 entry + offsetof(Args, skip), host[k].skip});
  }
  capture.used = at + bytes;
  return reinterpret_cast<const Args*>(static_cast<std::uint8_t*>(capture.device.data_ptr()) + at);
}

// The device address a launch reads its table from: placed in the capture's buffer, or copied
// now (`keep` holds that copy until the launch is queued).
template <typename Args>
const Args* launch_table(CapturedArguments* capture, const std::vector<Args>& host,
                         const std::vector<size_t>& indices, const torch::Device& device,
                         torch::Tensor& keep) {
  if (capture) return place_captured(*capture, host, indices);
  keep = to_device_table(host, device);
  return reinterpret_cast<const Args*>(keep.data_ptr());
}

}  // namespace

size_t captured_table_bytes(size_t tensors) {
  return tensors *
         (std::max(sizeof(cuda::QuantizedTensorArgs), sizeof(cuda::Fp32StateTensorArgs)) + 16);
}

void upload_captured_arguments(const CapturedArguments& capture) {
  if (capture.used == 0) return;
  const int64_t bytes = static_cast<int64_t>(capture.used);
  torch::Tensor pinned = torch::empty({bytes}, torch::TensorOptions().dtype(torch::kUInt8)
                                                   .pinned_memory(true));
  std::memcpy(pinned.data_ptr(), capture.table.data(), capture.used);
  // Stream-ordered after the previous replay, which has read the table it replaces.
  capture.device.narrow(0, 0, bytes).copy_(pinned, /*non_blocking=*/true);
}

void adamw8bit_update_cuda(const std::vector<CudaParameterUpdate>& updates,
                           const std::map<int, std::array<torch::Tensor, 2>>& qmaps,
                           CapturedArguments* capture) {
  // (device index, dtype) -> argument tables, kept in parameter order.
  struct Group {
    std::vector<cuda::QuantizedTensorArgs> quantized;
    std::vector<size_t> quantized_indices;
    std::vector<cuda::Fp32StateTensorArgs> fp32_states;
    std::vector<size_t> fp32_indices;
    int64_t quantized_units = 0;
    int64_t fp32_units = 0;
  };
  std::map<std::pair<int, int>, Group> groups;
  for (const CudaParameterUpdate& u : updates) {
    check_update(u);
    const int64_t n = u.param.numel();
    if (n == 0) continue;  // nothing to update, and an empty launch is invalid
    Group& group = groups[{u.param.device().index(), static_cast<int>(u.param.scalar_type())}];
    if (u.quantized) {
      cuda::QuantizedTensorArgs a{};
      a.param = u.param.data_ptr();
      a.grad = u.grad.data_ptr();
      a.state1 = u.state1.data_ptr<std::uint8_t>();
      a.state2 = u.state2.data_ptr<std::uint8_t>();
      a.absmax1 = u.absmax1.data_ptr<float>();
      a.absmax2 = u.absmax2.data_ptr<float>();
      a.numel = n;
      a.first_unit = group.quantized_units;
      a.constants = u.constants;
      a.skip = u.skip.defined() ? u.skip.data_ptr<float>() : nullptr;
      a.vector_aligned = aligned(a.param, 16) && aligned(a.grad, 16) && aligned(a.state1, 8) &&
                         aligned(a.state2, 8);
      group.quantized.push_back(a);
      group.quantized_indices.push_back(u.index);
      group.quantized_units += num_quantization_blocks(n);
    } else {
      cuda::Fp32StateTensorArgs a{};
      a.param = u.param.data_ptr();
      a.grad = u.grad.data_ptr();
      a.exp_avg = u.state1.data_ptr<float>();
      a.exp_avg_sq = u.state2.data_ptr<float>();
      a.numel = n;
      a.first_unit = group.fp32_units;
      a.constants = u.constants;
      a.skip = u.skip.defined() ? u.skip.data_ptr<float>() : nullptr;
      group.fp32_states.push_back(a);
      group.fp32_indices.push_back(u.index);
      group.fp32_units += (n + cuda::kFp32StateChunk - 1) / cuda::kFp32StateChunk;
    }
  }

  for (const auto& [key, group] : groups) {
    const torch::Device device(torch::kCUDA, static_cast<c10::DeviceIndex>(key.first));
    const c10::cuda::CUDAGuard guard(device);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    const cuda::ElementType type =
        cuda_element_type(static_cast<c10::ScalarType>(key.second), "adamw8bit");
    if (!group.quantized.empty()) {
      const auto found = qmaps.find(key.first);
      TORCH_CHECK(found != qmaps.end(), "adamw8bit (CUDA): no tables on device ", device);
      torch::Tensor table;
      const auto* args =
          launch_table(capture, group.quantized, group.quantized_indices, device, table);
      check_launch(cuda::launch_adamw8bit_blockwise(
                       type, args, static_cast<int>(group.quantized.size()), group.quantized_units,
                       found->second[0].data_ptr<float>(), found->second[1].data_ptr<float>(),
                       stream),
                   "adamw8bit", "adamw8bit_blockwise_kernel");
    }
    if (!group.fp32_states.empty()) {
      torch::Tensor table;
      const auto* args =
          launch_table(capture, group.fp32_states, group.fp32_indices, device, table);
      check_launch(cuda::launch_adamw_fp32_states(
                       type, args, static_cast<int>(group.fp32_states.size()), group.fp32_units,
                       stream),
                   "adamw8bit", "adamw_fp32_states_kernel");
    }
  }
}

}  // namespace sdtrain::optim::detail

#endif  // SDTRAIN_WITH_CUDA
