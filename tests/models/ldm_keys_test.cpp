// The single-file (LDM) key rules of include/sdtrain/models/ldm_keys.h against every key of
// SD 1.5 and SD 2.1 as diffusers' conversion code names them (tests/fixtures/single_file/).
#include "sdtrain/models/ldm_keys.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "test_support.h"

namespace sdtrain::models {
namespace {

struct MapLine {
  std::string diffusers;
  std::string ldm;
  int rows_third = -1;
};

std::vector<MapLine> read_map(const std::string& name) {
  std::ifstream in(testing::fixture("single_file/" + name));
  std::vector<MapLine> lines;
  std::string line;
  while (std::getline(in, line)) {
    std::istringstream fields(line);
    MapLine entry;
    std::string ldm_field;
    std::getline(fields, entry.diffusers, '\t');
    std::getline(fields, ldm_field, '\t');
    const auto rows = ldm_field.find("  [rows ");
    entry.ldm = ldm_field.substr(0, rows);
    if (rows != std::string::npos) entry.rows_third = ldm_field[rows + 8] - '0';
    lines.push_back(entry);
  }
  return lines;
}

// SD 1.x and 2.x: two resnets per down block, the first up block without attention.
const LdmUNetLayout kSdUNet{2, {false, true, true, true}};

TEST(LdmKeys, UNetRulesGiveEverySD15AndSD21Key) {
  for (const char* map : {"ldm_map_unet_sd15.txt", "ldm_map_unet_sd21.txt"}) {
    const auto lines = read_map(map);
    ASSERT_EQ(lines.size(), 686u) << map;
    for (const auto& line : lines) EXPECT_EQ(ldm_unet_key(line.diffusers, kSdUNet), line.ldm) << map;
  }
}

TEST(LdmKeys, VaeRulesGiveEveryKey) {
  const auto lines = read_map("ldm_map_vae.txt");
  ASSERT_EQ(lines.size(), 248u);
  for (const auto& line : lines) EXPECT_EQ(ldm_vae_key(line.diffusers, 4), line.ldm);
}

TEST(LdmKeys, OpenClipRulesGiveEverySD21KeyAndSplitTheFusedProjections) {
  const auto lines = read_map("ldm_map_text_encoder_sd21.txt");
  ASSERT_EQ(lines.size(), 372u);
  int fused = 0;
  for (const auto& line : lines) {
    const LdmKey key = ldm_text_encoder_key(line.diffusers, LdmTextEncoder::open_clip);
    EXPECT_EQ(key.key, line.ldm);
    EXPECT_EQ(key.rows_third, line.rows_third) << line.diffusers;
    fused += key.rows_third >= 0;
  }
  EXPECT_EQ(fused, 23 * 6);  // q, k, v weight and bias in each of the 23 layers diffusers keeps
}

TEST(LdmKeys, ClipVitLKeysKeepTransformersNamesUnderTheirPrefix) {
  EXPECT_EQ(ldm_text_encoder_key("text_model.encoder.layers.3.self_attn.q_proj.weight", LdmTextEncoder::clip_vit_l).key,
            "cond_stage_model.transformer.text_model.encoder.layers.3.self_attn.q_proj.weight");
}

// The rules follow the block structure, so another configuration (the tiny test models: one
// resnet per block) gets its own indices, not SD's.
TEST(LdmKeys, OtherLayoutsGetTheirOwnIndices) {
  const LdmUNetLayout tiny{1, {false, true}};
  EXPECT_EQ(ldm_unet_key("down_blocks.1.resnets.0.conv1.weight", tiny), "model.diffusion_model.input_blocks.3.0.in_layers.2.weight");
  EXPECT_EQ(ldm_unet_key("down_blocks.0.downsamplers.0.conv.weight", tiny), "model.diffusion_model.input_blocks.2.0.op.weight");
  EXPECT_EQ(ldm_unet_key("up_blocks.0.upsamplers.0.conv.bias", tiny), "model.diffusion_model.output_blocks.1.1.conv.bias");
  EXPECT_EQ(ldm_unet_key("up_blocks.1.attentions.1.proj_in.weight", tiny), "model.diffusion_model.output_blocks.3.1.proj_in.weight");
  EXPECT_EQ(ldm_vae_key("decoder.up_blocks.0.upsamplers.0.conv.weight", 2), "first_stage_model.decoder.up.1.upsample.conv.weight");
}

TEST(LdmKeys, KeysOfNoLayerAreRefused) {
  for (const char* key : {"conv_inn.weight", "down_blocks.0.resnets.2.conv1.weight", "up_blocks.x.resnets.0.conv1.weight",
                          "mid_block.resnets.2.conv1.weight", "down_blocks.0.downsamplers.1.conv.weight", "add_embedding.weight"}) {
    EXPECT_THROW(ldm_unet_key(key, kSdUNet), std::invalid_argument) << key;
  }
  EXPECT_THROW(ldm_vae_key("decoder.up_blocks.4.resnets.0.conv1.weight", 4), std::invalid_argument);
  EXPECT_THROW(ldm_vae_key("encoder.up_blocks.0.resnets.0.conv1.weight", 4), std::invalid_argument);
  EXPECT_THROW(ldm_text_encoder_key("text_model.encoder.layers.0.self_attn.w_proj.weight", LdmTextEncoder::open_clip),
               std::invalid_argument);
  EXPECT_THROW(ldm_text_encoder_key("logit_scale", LdmTextEncoder::open_clip), std::invalid_argument);
}

}  // namespace
}  // namespace sdtrain::models
