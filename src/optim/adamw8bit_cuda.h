#pragma once
// Torch-facing side of the 8-bit AdamW CUDA kernels (internal to src/optim).

#include <torch/torch.h>

#include <array>
#include <map>
#include <vector>

#include "sdtrain/optim/adam_element_math.h"
#include "sdtrain/optim/captured_arguments.h"

namespace sdtrain::optim::detail {

struct CudaParameterUpdate {
  size_t index = 0;     // the optimizer's parameter index (recorded by a capture)
  torch::Tensor param;  // CUDA, contiguous, float32/float16/bfloat16
  torch::Tensor grad;   // same dtype, device and numel, contiguous
  bool quantized = false;
  torch::Tensor state1, state2;    // uint8 [n] (quantized) or fp32 [n]
  torch::Tensor absmax1, absmax2;  // fp32 [ceil(n/256)] (quantized only)
  AdamStepConstants constants;
  torch::Tensor skip;  // undefined, or float32 [1] on the device: nonzero leaves all untouched
};

// Updates every entry with at most two launches per (device, dtype) group, on each device's
// current stream, without synchronising the host. qmaps: per device index, [signed, unsigned].
// `capture`: the launches are being captured in a CUDA graph; their argument tables go into
// capture->table and are read from capture->device (uploaded by upload_captured_arguments
// before each replay) instead of being copied now.
void adamw8bit_update_cuda(const std::vector<CudaParameterUpdate>& updates,
                           const std::map<int, std::array<torch::Tensor, 2>>& qmaps,
                           CapturedArguments* capture = nullptr);

// Bytes of argument table that `tensors` captured updates can need at most (one tensor per
// launch, each launch 16-byte aligned).
size_t captured_table_bytes(size_t tensors);

// Queues the copy of capture.table (its used bytes) to capture.device on the current stream,
// through pinned memory, without synchronising the host.
void upload_captured_arguments(const CapturedArguments& capture);

}  // namespace sdtrain::optim::detail
