#pragma once
// The element types sdtrain's CUDA kernels take, named without a torch header so that the
// kernels' own headers (src/**/*.cu) stay torch-free and nvcc stays fast. The torch side maps
// a tensor's dtype to it with cuda_element_type (include/sdtrain/util/cuda_launch.h).

#include <cstdint>

namespace sdtrain::cuda {

enum class ElementType : int32_t { float32 = 0, float16 = 1, bfloat16 = 2 };

}  // namespace sdtrain::cuda
