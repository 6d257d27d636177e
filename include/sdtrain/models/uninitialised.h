#pragma once
// Building a model whose every weight a loader is about to replace, without initialising it.
//
// torch::nn's layers initialise their parameters in their constructors (kaiming_uniform_ for
// Linear and Conv2d, normal_ for Embedding, ones/zeros for the norms). For SD 2.1-base's UNet
// that is 866 M random draws into 3.5 GB of fresh host memory: 7.8 s on one core of the build
// machine (docs/benchmarks.md, "Loading"), all of it thrown away when the strict load
// (models/state_dict.h) gives every parameter and buffer the file's tensor. diffusers avoids
// the same waste by building its models under accelerate's init_empty_weights.
//
// Inside an UninitialisedScope, operators run on existing tensors are dispatched to their Meta
// kernels (the Meta backend key is added to this thread's dispatch keys, and it outranks every
// other backend): the initialisers check shapes and write nothing. Factory functions still
// allocate on the CPU (BackendSelect picks the kernel from the requested device), but an
// untouched allocation costs no page. So the module has the right parameter and buffer
// shapes, dtypes and names, with unspecified values: only a loader that replaces each of them
// (load_state_dict, assign_state_dict) may use it, after the scope has closed.
//
// Nothing that computes values may run inside the scope; the models' constructors only
// register layers (their forward passes compute everything else).
//
// The scope saves this thread's dispatch key sets and restores them exactly when it closes
// (c10's ForceDispatchKeyGuard). IncludeDispatchKeyGuard would not do: removing a key set
// keeps its backend bits, so the Meta backend bit would stay and every later operator on a
// CPU tensor would keep running its Meta kernel (tests/models/uninitialised_test.cpp).

#include <c10/core/impl/LocalDispatchKeySet.h>

#include <utility>

namespace sdtrain::models {

class UninitialisedScope {
 public:
  UninitialisedScope()
      : keys_(c10::impl::tls_local_dispatch_key_set().included_ |
                  c10::DispatchKeySet(c10::DispatchKey::Meta),
              c10::impl::tls_local_dispatch_key_set().excluded_) {}
  UninitialisedScope(const UninitialisedScope&) = delete;
  UninitialisedScope& operator=(const UninitialisedScope&) = delete;

 private:
  c10::impl::ForceDispatchKeyGuard keys_;
};

// `build()` (a module constructor call) with its initialisation skipped, as above.
template <typename Build>
auto build_uninitialised(Build&& build) {
  UninitialisedScope scope;
  return std::forward<Build>(build)();
}

}  // namespace sdtrain::models
