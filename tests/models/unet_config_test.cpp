// UNet2DConditionConfig parsing and validation, the strict weight loader on UNet folders, and
// the real SD configs (parameter totals and key sets, built without loading weights).

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>
#include <fstream>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "unet_vae_support.h"

using namespace sdtrain;
using namespace sdtrain::models;
namespace fs = std::filesystem;

namespace {

nlohmann::json real_config(const std::string& name) {
  return read_json_file(sdtrain::testing::fixture("configs/" + name + "/config.json"), ExitCode::model);
}

using sdtrain::testing::expect_model_error;

TEST(UNetConfig, ParsesTheRealConfigs) {
  auto sd21 = UNet2DConditionConfig::from_json(real_config("unet_sd21_base"));
  EXPECT_EQ(sd21.num_attention_heads, (std::vector<int64_t>{5, 10, 20, 20}));
  EXPECT_EQ(sd21.cross_attention_dim, (std::vector<int64_t>{1024, 1024, 1024, 1024}));
  EXPECT_TRUE(sd21.use_linear_projection);
  EXPECT_FALSE(sd21.upcast_attention);  // key absent: diffusers' default
  EXPECT_EQ(sd21.sample_size, 64);
  EXPECT_EQ(sd21.layers_per_block, (std::vector<int64_t>{2, 2, 2, 2}));
  EXPECT_EQ(sd21.time_embed_dim(), 1280);

  auto sd15 = UNet2DConditionConfig::from_json(real_config("unet_sd15"));
  EXPECT_EQ(sd15.num_attention_heads, (std::vector<int64_t>{8, 8, 8, 8}));  // int expanded
  EXPECT_EQ(sd15.cross_attention_dim, (std::vector<int64_t>{768, 768, 768, 768}));
  EXPECT_FALSE(sd15.use_linear_projection);
  EXPECT_FALSE(sd15.upcast_attention);  // "upcast_attention": null

  auto sd21_768 = UNet2DConditionConfig::from_json(real_config("unet_sd21_768"));
  EXPECT_TRUE(sd21_768.upcast_attention);
  EXPECT_EQ(sd21_768.sample_size, 96);

  // Every key absent: diffusers' constructor defaults.
  auto defaults = UNet2DConditionConfig::from_json(nlohmann::json::object());
  EXPECT_EQ(defaults.block_out_channels, (std::vector<int64_t>{320, 640, 1280, 1280}));
  EXPECT_EQ(defaults.cross_attention_dim, (std::vector<int64_t>{1280, 1280, 1280, 1280}));
  EXPECT_EQ(defaults.num_attention_heads, (std::vector<int64_t>{8, 8, 8, 8}));
  EXPECT_FALSE(defaults.sample_size.has_value());
}

TEST(UNetConfig, UnsupportedValuesNameTheKey) {
  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"class_embed_type", "timestep"},
      {"num_class_embeds", 10},
      {"addition_embed_type", "text_time"},
      {"addition_time_embed_dim", 256},
      {"time_cond_proj_dim", 256},
      {"resnet_time_scale_shift", "scale_shift"},
      {"num_attention_heads", 8},
      {"only_cross_attention", true},
      {"only_cross_attention", {false, true, false, false}},
      {"dual_cross_attention", true},
      {"mid_block_type", "UNetMidBlock2DSimpleCrossAttn"},
      {"mid_block_type", nullptr},
      {"down_block_types", {"SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"}},
      {"up_block_types", {"UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D"}},
      {"act_fn", "gelu"},
      {"time_embedding_type", "fourier"},
      {"encoder_hid_dim_type", "text_proj"},
      {"attention_type", "gated"},
      {"transformer_layers_per_block", {{1, 2}, 1, 1, 1}},
      {"attention_head_dim", {5, 10, 20}},
      {"attention_head_dim", 7},  // 320 channels are not a multiple of 7 heads
      {"dropout", 0.1},
      {"norm_num_groups", nullptr},
  };
  for (const auto& [key, value] : cases) {
    auto json = real_config("unet_sd21_base");
    json[key] = value;
    SCOPED_TRACE(key + " = " + value.dump());
    expect_model_error([&] { UNet2DConditionConfig::from_json(json, "unet/config.json"); },
                       {"unet/config.json", key, value.dump()});
  }
}

// A UNet fixture folder copied to scratch with its weights modified by `edit`.
fs::path edited_copy(const std::string& fixture_name, const std::function<void(io::NamedTensors&)>& edit) {
  return sdtrain::testing::edited_copy(sdtrain::testing::model_fixture(fixture_name),
                                       "diffusion_pytorch_model.safetensors", edit);
}

TEST(UNetLoader, MissingTensorIsNamed) {
  const std::string victim = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight";
  fs::path dir = edited_copy("unet_sd2", [&](io::NamedTensors& t) {
    auto it = std::find_if(t.begin(), t.end(), [&](const auto& p) { return p.first == victim; });
    ASSERT_NE(it, t.end());
    t.erase(it);
  });
  expect_model_error([&] { load_unet(dir, LoadOptions{}); }, {"missing", victim});
}

TEST(UNetLoader, WrongShapeIsNamed) {
  // An SD1.5-style conv proj_in [C, C, 1, 1] in an SD2-style (linear projection) model.
  const std::string victim = "down_blocks.0.attentions.1.proj_in.weight";
  fs::path dir = edited_copy("unet_sd2", [&](io::NamedTensors& t) {
    for (auto& [key, value] : t) {
      if (key == victim) value = value.unsqueeze(-1).unsqueeze(-1).contiguous();
    }
  });
  expect_model_error([&] { load_unet(dir, LoadOptions{}); }, {victim, "expected [8, 8]", "found [8, 8, 1, 1]"});
}

TEST(UNetLoader, UnexpectedTensorIsNamed) {
  fs::path dir = edited_copy("unet_sd15", [&](io::NamedTensors& t) { t.emplace_back("class_embedding.weight", torch::zeros({4})); });
  expect_model_error([&] { load_unet(dir, LoadOptions{}); }, {"unexpected", "class_embedding.weight"});
}

TEST(UNetLoader, LoadsFromAModelFolderInTheRequestedDtype) {
  io::ModelFolder folder(sdtrain::testing::source_dir() / "configs/demo/model");
  auto unet = load_unet(folder, LoadOptions{torch::kHalf, torch::kCPU});
  for (const auto& p : unet->parameters()) ASSERT_EQ(p.scalar_type(), torch::kHalf);
  EXPECT_EQ(unet->config().block_out_channels, (std::vector<int64_t>{32, 64, 64}));
  // The weights are the file's: compare one tensor.
  io::SafetensorsFile file(folder.weights("unet").files.front());
  EXPECT_TRUE(torch::equal(unet->conv_in->weight, file.tensor("conv_in.weight").to(torch::kHalf)));
}

// Builds the real-size model (random init, no weights: ~3.5 GB for a few seconds) and checks
// the parameter total and that named_parameters() equals diffusers' state-dict keys and shapes
// (tests/fixtures/configs/keys_*.txt), so real checkpoints load with no key mapping.
void check_real_unet(const std::string& config_name, const std::string& keys_file, int64_t expected_total) {
  UNet2DConditionModel unet(UNet2DConditionConfig::from_json(real_config(config_name)));
  EXPECT_EQ(parameter_count(*unet), expected_total) << config_name;
  auto expected = sdtrain::testing::read_key_list(keys_file);
  std::size_t seen = 0;
  for (const auto& item : unet->named_parameters()) {
    auto it = expected.find(item.key());
    if (it == expected.end()) {
      ADD_FAILURE() << config_name << ": unexpected parameter " << item.key();
      continue;
    }
    EXPECT_EQ(sdtrain::testing::shape_text(item.value().sizes()), it->second) << item.key();
    ++seen;
  }
  EXPECT_EQ(seen, expected.size()) << config_name << ": parameters missing relative to " << keys_file;
  EXPECT_TRUE(unet->named_buffers().is_empty());
}

TEST(UNetRealConfigs, SD21BaseParameterTotalAndKeys) {
  check_real_unet("unet_sd21_base", "keys_unet_sd21.txt", 865'910'724);
}

TEST(UNetRealConfigs, SD15ParameterTotalAndKeys) {
  check_real_unet("unet_sd15", "keys_unet_sd15.txt", 859'520'964);
}

}  // namespace
