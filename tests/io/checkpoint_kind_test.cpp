// detect_checkpoint (include/sdtrain/io/checkpoint_kind.h): each kind of file is told from
// its keys, and the deciding keys are named.
#include "sdtrain/io/checkpoint_kind.h"

#include <gtest/gtest.h>

#include <fstream>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/base_model.h"
#include "test_support.h"

namespace sdtrain::io {
namespace {

SafetensorsHeader header_with(
    const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors) {
  SafetensorsHeader header;
  for (const auto& [name, shape] : tensors)
    header.tensors.push_back({name, SafetensorsDtype::F16, shape, 0, 0});
  return header;
}

const std::pair<std::string, std::vector<int64_t>> kUNetIn{
    "model.diffusion_model.input_blocks.0.0.weight", {320, 4, 3, 3}};

TEST(CheckpointKind, StableDiffusionFamiliesByTextEncoder) {
  const auto sd2 = detect_checkpoint(header_with(
      {kUNetIn,
       {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",
        {320, 1024}},
       {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", {3072, 1024}}}));
  EXPECT_EQ(sd2.kind, CheckpointKind::sd2_single_file);
  EXPECT_NE(sd2.description.find("cross-attention 1024"), std::string::npos) << sd2.description;
  EXPECT_NE(sd2.description.find("v-prediction"), std::string::npos);
  const auto sd1 = detect_checkpoint(header_with(
      {kUNetIn,
       {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", {49408, 768}},
       {"model_ema.diffusion_modelinput_blocks00weight", {320, 4, 3, 3}}}));
  EXPECT_EQ(sd1.kind, CheckpointKind::sd1_single_file);
  EXPECT_NE(sd1.description.find("EMA"), std::string::npos) << sd1.description;
  EXPECT_EQ(sd1.evidence.size(), 2u);
}

TEST(CheckpointKind, OtherArchitecturesAndAdapterFiles) {
  EXPECT_EQ(detect_checkpoint(
                header_with({kUNetIn, {"conditioner.embedders.0.transformer.text_model.x", {1}}}))
                .kind,
            CheckpointKind::sdxl_single_file);
  EXPECT_EQ(detect_checkpoint(header_with({{"model.diffusion_model.joint_blocks.0.x", {1}}})).kind,
            CheckpointKind::sd3_single_file);
  EXPECT_EQ(detect_checkpoint(
                header_with(
                    {{"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", {4, 320}}}))
                .kind,
            CheckpointKind::lora_kohya);
  EXPECT_EQ(detect_checkpoint(
                header_with({{"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", {4, 320}}}))
                .kind,
            CheckpointKind::lora_diffusers);
  EXPECT_EQ(detect_checkpoint(header_with({{"conv_in.weight", {320, 4, 3, 3}}})).kind,
            CheckpointKind::unknown);
  EXPECT_EQ(detect_checkpoint(header_with({kUNetIn})).kind,
            CheckpointKind::unknown);  // a UNet alone
}

// A file given where a base model folder belongs is refused, saying what it is and what to do.
TEST(CheckpointKind, AFileAsTheBaseModelIsRefusedSayingWhatItIs) {
  // open_base_model decides from the detection (tests/models/base_model_test.cpp has the rest);
  // ModelFolder itself is for folders.
  const auto dir = testing::scratch_dir();
  std::ofstream(dir / "model.ckpt") << "PK\x03\x04";
  testing::expect_model_error([&] { models::open_base_model(dir / "model.ckpt"); },
                              {"model.ckpt", "pickle", "safetensors"});
  testing::expect_model_error([&] { ModelFolder folder(dir / "model.ckpt"); },
                              {"model.ckpt", "model folder not found"});
  save_safetensors(
      dir / "adapter.safetensors",
      {{"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight", torch::zeros({4, 8})}});
  testing::expect_model_error([&] { models::open_base_model(dir / "adapter.safetensors"); },
                              {"adapter.safetensors", "LoRA adapters", "generate --lora"});
  // An SD 2.x file is read as the base; this one lacks nearly every block, which is named.
  save_safetensors(dir / "sd2.safetensors",
                   {{"model.diffusion_model.input_blocks.0.0.weight", torch::zeros({8, 4, 3, 3})},
                    {"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight",
                     torch::zeros({6, 2})}});
  testing::expect_model_error([&] { models::open_base_model(dir / "sd2.safetensors"); },
                              {"sd2.safetensors", "is missing", "single_file_config"});
}

}  // namespace
}  // namespace sdtrain::io
