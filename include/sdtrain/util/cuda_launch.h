#pragma once
// Torch-facing helpers shared by the launchers of sdtrain's CUDA kernels (built with CUDA only).

#include <cuda_runtime_api.h>
#include <torch/torch.h>

#include "sdtrain/util/cuda_element_type.h"

namespace sdtrain::cuda {

// float32, float16 or bfloat16; any other dtype fails, naming `who` (the operation).
ElementType cuda_element_type(c10::ScalarType type, const char* who);

// Fails, naming `who` and `kernel`, when a launch returned an error.
void check_launch(cudaError_t error, const char* who, const char* kernel);

}  // namespace sdtrain::cuda
