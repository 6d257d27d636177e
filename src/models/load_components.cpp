#include "sdtrain/models/load_components.h"

#include <ATen/ThreadLocalState.h>

#include <exception>
#include <future>
#include <utility>

namespace sdtrain::models {
namespace {

// `load()` on a new thread that starts with this thread's thread-local state (std::async alone
// would start from the defaults: grad mode on, no dispatch keys set).
template <typename Load>
auto on_a_thread_of_its_own(Load load) {
  return std::async(std::launch::async, [state = at::ThreadLocalState(), load = std::move(load)] {
    at::ThreadLocalStateGuard keep(state);
    return load();
  });
}

}  // namespace

LoadedComponents load_components(const io::ModelFolder& folder,
                                 const ComponentLoadOptions& options) {
  auto text_encoder = on_a_thread_of_its_own(
      [&] { return load_text_encoder(folder, options.text_encoder, options.variant); });
  auto vae = on_a_thread_of_its_own([&] { return load_vae(folder, options.vae, options.variant); });
  LoadedComponents loaded;
  // The largest on this thread. A failure waits for the other two (their futures' get), so that
  // the error reported follows the fixed order, and no thread outlives the folder it reads.
  std::exception_ptr unet_failed;
  try {
    loaded.unet = load_unet(folder, options.unet, options.variant);
  } catch (...) {
    unet_failed = std::current_exception();
  }
  std::exception_ptr vae_failed;
  try {
    loaded.vae = vae.get();
  } catch (...) {
    vae_failed = std::current_exception();
  }
  loaded.text_encoder = text_encoder.get();
  if (unet_failed) std::rethrow_exception(unet_failed);
  if (vae_failed) std::rethrow_exception(vae_failed);
  return loaded;
}

}  // namespace sdtrain::models
