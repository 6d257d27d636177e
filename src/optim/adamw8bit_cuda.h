#pragma once
// Torch-facing side of the 8-bit AdamW CUDA kernels (internal to src/optim).

#include <torch/torch.h>

#include <array>
#include <map>
#include <vector>

#include "sdtrain/optim/adam_element_math.h"

namespace sdtrain::optim::detail {

struct CudaParameterUpdate {
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
void adamw8bit_update_cuda(const std::vector<CudaParameterUpdate>& updates,
                           const std::map<int, std::array<torch::Tensor, 2>>& qmaps);

}  // namespace sdtrain::optim::detail
