#pragma once
// CUDA's sync debug mode set to "error" for a scope (the C++ side of
// torch.cuda.set_sync_debug_mode("error")): any operation that waits for the GPU throws. The
// mode goes back to off at the end of the scope, even when the body throws.

#if SDTRAIN_WITH_CUDA
#include <c10/cuda/CUDAFunctions.h>

namespace sdtrain::testing {

class SyncDebugError {
 public:
  SyncDebugError() {
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_ERROR);
  }
  ~SyncDebugError() {
    c10::cuda::warning_state().set_sync_debug_mode(c10::cuda::SyncDebugMode::L_DISABLED);
  }
  SyncDebugError(const SyncDebugError&) = delete;
  SyncDebugError& operator=(const SyncDebugError&) = delete;
};

}  // namespace sdtrain::testing
#endif
