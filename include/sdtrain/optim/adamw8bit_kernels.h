#pragma once
// Launchers of the 8-bit AdamW CUDA kernels (src/optim/adamw8bit.cu). Plain pointers, element
// counts and a stream: no torch header, so nvcc stays fast. The torch-facing checks live in
// src/optim/adamw8bit_cuda.cpp.
//
// Multi-tensor apply: the caller places an array of per-tensor arguments in device memory; one
// launch updates every tensor in it. Units (a 256-element quantization block, or a chunk of
// kFp32StateChunk elements) are numbered consecutively across tensors: tensor t owns units
// [first_unit(t), first_unit(t+1)), and each warp or CTA finds its tensor by binary search.

#include <cuda_runtime_api.h>

#include <cstdint>

#include "sdtrain/optim/adam_element_math.h"
#include "sdtrain/util/cuda_element_type.h"

namespace sdtrain::optim::cuda {

using ::sdtrain::cuda::ElementType;

inline constexpr int kFp32StateChunk = 1024;

struct QuantizedTensorArgs {
  void* param;                    // numel elements of the ElementType
  const void* grad;               // numel elements of the ElementType
  std::uint8_t* state1;           // numel codes of m (signed map)
  std::uint8_t* state2;           // numel codes of v (unsigned map)
  float* absmax1;                 // ceil(numel / 256)
  float* absmax2;                 // ceil(numel / 256)
  int64_t numel;
  int64_t first_unit;             // first quantization block of this tensor in the launch
  AdamStepConstants constants;
  const float* skip;              // null, or one float: nonzero leaves the tensor untouched
  int32_t vector_aligned;         // param/grad 16-byte and states 8-byte aligned
};

struct Fp32StateTensorArgs {
  void* param;
  const void* grad;
  float* exp_avg;
  float* exp_avg_sq;
  int64_t numel;
  int64_t first_unit;             // first chunk of kFp32StateChunk elements in the launch
  AdamStepConstants constants;
  const float* skip;              // null, or one float: nonzero leaves the tensor untouched
};

// args: device array of num_tensors entries; total_units: blocks (resp. chunks) of all of them.
// qmaps: device fp32 [256] each. Returns the launch error, if any; never synchronises.
cudaError_t launch_adamw8bit_blockwise(ElementType type, const QuantizedTensorArgs* args,
                                       int num_tensors, int64_t total_units,
                                       const float* qmap_signed, const float* qmap_unsigned,
                                       cudaStream_t stream);
cudaError_t launch_adamw_fp32_states(ElementType type, const Fp32StateTensorArgs* args,
                                     int num_tensors, int64_t total_units, cudaStream_t stream);

}  // namespace sdtrain::optim::cuda
