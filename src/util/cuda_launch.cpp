// Compiled only into a build with CUDA kernels: its header includes the CUDA runtime API.
#if SDTRAIN_WITH_CUDA

#include "sdtrain/util/cuda_launch.h"

namespace sdtrain::cuda {

ElementType cuda_element_type(c10::ScalarType type, const char* who) {
  switch (type) {
    case torch::kFloat32:
      return ElementType::float32;
    case torch::kFloat16:
      return ElementType::float16;
    case torch::kBFloat16:
      return ElementType::bfloat16;
    default:
      TORCH_CHECK(false, who, " (CUDA): unsupported dtype ", type,
                  " (float32, float16 or bfloat16)");
  }
}

void check_launch(cudaError_t error, const char* who, const char* kernel) {
  TORCH_CHECK(error == cudaSuccess, who, " (CUDA): launch of ", kernel,
              " failed: ", cudaGetErrorString(error));
}

}  // namespace sdtrain::cuda

#endif  // SDTRAIN_WITH_CUDA
