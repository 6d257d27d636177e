#pragma once
// Converting a pipeline's weights between diffusers' component layout and the original
// single-file (LDM) layout, with the key rules of ldm_keys.h (docs/single_file.md):
//  * to_single_file: every component's tensors under their single-file names; OpenCLIP's q/k/v
//    fused into in_proj rows, the VAE's attention projections as 1x1 convolutions;
//  * from_single_file: the tensors a component expects, each read (or cut) from the file.
// Nothing is cast or copied beyond what a reshape or a concatenation needs, so a round trip in
// fp32 gives the same bits.

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/ldm_keys.h"
#include "sdtrain/models/unet_2d_condition.h"

namespace sdtrain::models {

// What the key rules need of a pipeline's configuration.
struct SingleFileLayout {
  LdmUNetLayout unet;
  int64_t vae_up_blocks = 4;
  LdmTextEncoder text_encoder = LdmTextEncoder::clip_vit_l;
};

// From the component configurations: SD 2.x text encoders (exact GELU) are OpenCLIP's, SD 1.x
// (quick GELU) OpenAI CLIP's. std::invalid_argument for a UNet whose blocks differ in
// layers_per_block (no single-file layout has that).
SingleFileLayout single_file_layout(const UNet2DConditionConfig& unet,
                                    const AutoencoderKLConfig& vae,
                                    const CLIPTextConfig& text_encoder);

// `components`: "unet", "vae", "text_encoder" -> their diffusers state dicts.
io::NamedTensors to_single_file(const std::map<std::string, io::NamedTensors>& components,
                                const SingleFileLayout& layout);

// The diffusers tensors of `component` ("unet", "vae", "text_encoder") named in `expected`
// (key and shape, e.g. the module's own state dict), read from `file`. Throws ModelError naming
// the file and the first missing or mis-shaped single-file keys. `ema`: the UNet from the EMA
// copy LDM keeps beside it (model_ema.<key after "model." without its dots>).
io::NamedTensors from_single_file(const io::SafetensorsFile& file, const std::string& component,
                                  const io::NamedTensors& expected, const SingleFileLayout& layout,
                                  bool ema = false);

// LDM's name for the EMA copy of a UNet weight (LitEma drops the dots of the module path).
std::string ldm_ema_key(const std::string& ldm_unet_key);

}  // namespace sdtrain::models
