#pragma once
// The names the original single-file checkpoints (CompVis / Stability "LDM" layout, what
// AUTOMATIC1111 and ComfyUI load) give the weights of SD 1.x and 2.x, computed from diffusers'
// names by rule: the inverse of the conversions in diffusers' single_file_utils.py
// (docs/single_file.md). The rules follow the UNet's block structure, so they hold for any
// configuration of it (the tiny test models included), not only for the published ones;
// tests/fixtures/single_file/ holds every key of SD 1.5 and SD 2.1 as the oracle.
//
//   UNet   model.diffusion_model.*: down block i, resnet j -> input_blocks.(1 + i(L+1) + j).0,
//          its attention j -> .1, its downsampler -> input_blocks.(1 + i(L+1) + L).0.op;
//          up block i, resnet j -> output_blocks.(i(L+1) + j).0, attention -> .1, upsampler ->
//          output_blocks.(i(L+1) + L).(1, or 2 after an attention).conv; L = layers_per_block.
//   VAE    first_stage_model.*: down.i.block.j, up.(n-1-i).block.j (LDM counts up blocks from
//          the lowest resolution), mid.block_1/attn_1/block_2; attention q/k/v/proj_out are
//          1x1 convolutions there ([C, C, 1, 1] for diffusers' [C, C]).
//   Text   SD 1.x: cond_stage_model.transformer.<transformers' key>. SD 2.x (OpenCLIP):
//          cond_stage_model.model.transformer.resblocks.i.*, q/k/v fused in attn.in_proj_*
//          (rows [0, D), [D, 2D), [2D, 3D)).

#include <cstdint>
#include <string>
#include <vector>

namespace sdtrain::models {

// What the UNet key rules need of its configuration.
struct LdmUNetLayout {
  int64_t layers_per_block = 2;
  std::vector<bool> up_block_has_attention;  // per up block, in diffusers' order
};

enum class LdmTextEncoder { clip_vit_l, open_clip };  // SD 1.x, SD 2.x

// A single-file key and, for OpenCLIP's fused projections, which third of its rows.
struct LdmKey {
  std::string key;
  int rows_third =
      -1;  // 0 (q), 1 (k), 2 (v) of in_proj_weight / in_proj_bias; -1: the whole tensor
};

// Each throws std::invalid_argument for a key of no SD 1.x / 2.x layer.
std::string ldm_unet_key(const std::string& diffusers_key, const LdmUNetLayout& layout);
std::string ldm_vae_key(const std::string& diffusers_key, int64_t num_up_blocks);
LdmKey ldm_text_encoder_key(const std::string& diffusers_key, LdmTextEncoder family);

}  // namespace sdtrain::models
