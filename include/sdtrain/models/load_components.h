#pragma once
// The three model components of a Stable Diffusion base (text encoder, UNet, VAE) loaded at
// the same time, each on a thread of its own. A load is reading a mapped file, casting on the
// host and (on CUDA) transferring: one component's load leaves most of a many-core host idle,
// and loaded one after another the VAE and text encoder (a third of SD 2.1-base's bytes) wait
// for the UNet. At once, their host work overlaps (docs/performance.md, "The components load
// at once"; measured in docs/benchmarks.md). Each module gets exactly the bits a load of its
// own gives (tests/models/load_components_test.cpp).

#include <string>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"

namespace sdtrain::models {

// Where and in which dtype each component goes; `variant` as load_unet takes it.
struct ComponentLoadOptions {
  LoadOptions text_encoder;
  LoadOptions unet;
  LoadOptions vae;
  std::string variant;
};

struct LoadedComponents {
  CLIPTextModel text_encoder{nullptr};
  UNet2DConditionModel unet{nullptr};
  AutoencoderKL vae{nullptr};
};

// load_text_encoder, load_unet and load_vae of `folder`, run at once; the caller's thread-local
// state (grad mode, dispatch keys) holds in each. Returns when all three are loaded (on CUDA,
// when their copies are complete). When loads fail, the error thrown is that of the first
// failing component in the order text encoder, UNet, VAE (not the first to fail in time), so
// the same input always gives the same message.
LoadedComponents load_components(const io::ModelFolder& folder,
                                 const ComponentLoadOptions& options);

}  // namespace sdtrain::models
