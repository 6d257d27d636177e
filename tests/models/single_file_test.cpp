// Converting the bundled tiny pipeline to the single-file (LDM) layout and back
// (include/sdtrain/models/single_file.h): every tensor returns with the same bits, the fused and
// reshaped tensors have the single-file shapes, and a file that lacks a weight or holds one of
// another shape is refused naming it.
#include "sdtrain/models/single_file.h"

#include <gtest/gtest.h>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace sdtrain::models {
namespace {

struct TinyPipeline {
  io::ModelFolder folder{testing::source_dir() / "configs" / "demo" / "model"};
  std::map<std::string, io::NamedTensors> components;
  SingleFileLayout layout;

  TinyPipeline() {
    const LoadOptions fp32{torch::kFloat, torch::kCPU};
    components["unet"] = state_dict(*load_unet(folder, fp32, ""));
    components["vae"] = state_dict(*load_vae(folder, fp32, ""));
    components["text_encoder"] = state_dict(*load_text_encoder(folder, fp32, ""));
    layout = single_file_layout(UNet2DConditionConfig::from_json(folder.config("unet")),
                                AutoencoderKLConfig::from_json(folder.config("vae")),
                                CLIPTextConfig::from_json(folder.config("text_encoder"), "text_encoder/config.json"));
  }
};

TEST(SingleFile, TheTinyPipelineRoundTripsBitForBit) {
  TinyPipeline tiny;
  EXPECT_EQ(tiny.layout.text_encoder, LdmTextEncoder::open_clip);  // exact GELU: the SD 2.x family
  const std::filesystem::path path = testing::scratch_dir() / "model.safetensors";
  io::save_safetensors(path, to_single_file(tiny.components, tiny.layout));
  const io::SafetensorsFile file(path);
  ASSERT_NE(file.find("model.diffusion_model.input_blocks.0.0.weight"), nullptr);
  ASSERT_NE(file.find("first_stage_model.decoder.mid.attn_1.q.weight"), nullptr);
  EXPECT_EQ(file.find("first_stage_model.decoder.mid.attn_1.q.weight")->shape.size(), 4u);
  const io::TensorEntry* fused = file.find("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight");
  ASSERT_NE(fused, nullptr);
  EXPECT_EQ(fused->shape, (std::vector<int64_t>{96, 32}));
  size_t total = 0;
  for (const auto& [component, tensors] : tiny.components) {
    const io::NamedTensors back = from_single_file(file, component, tensors, tiny.layout);
    ASSERT_EQ(back.size(), tensors.size()) << component;
    for (size_t i = 0; i < tensors.size(); ++i) {
      EXPECT_EQ(back[i].first, tensors[i].first);
      EXPECT_TRUE(torch::equal(back[i].second, tensors[i].second)) << component << "." << tensors[i].first;
    }
    total += tensors.size();
  }
  // Three text-encoder tensors become one per fused projection: 2 layers x (weight, bias) x (3 - 1).
  EXPECT_EQ(file.tensors().size(), total - 2 * 2 * 2);
}

TEST(SingleFile, AMissingOrMisShapedWeightIsRefusedNamingIt) {
  TinyPipeline tiny;
  io::NamedTensors tensors = to_single_file(tiny.components, tiny.layout);
  const std::string dropped = "model.diffusion_model.out.2.weight";
  const std::string resized = "first_stage_model.encoder.conv_in.bias";
  io::NamedTensors edited;
  for (auto& [key, tensor] : tensors) {
    if (key == dropped) continue;
    edited.emplace_back(key, key == resized ? torch::zeros({7}) : tensor);
  }
  const std::filesystem::path path = testing::scratch_dir() / "broken.safetensors";
  io::save_safetensors(path, edited);
  const io::SafetensorsFile file(path);
  testing::expect_model_error([&] { from_single_file(file, "unet", tiny.components["unet"], tiny.layout); },
                              {"broken.safetensors", dropped, "missing"});
  testing::expect_model_error([&] { from_single_file(file, "vae", tiny.components["vae"], tiny.layout); },
                              {"broken.safetensors", resized, "[7]"});
}

TEST(SingleFile, LayoutsFollowTheConfiguration) {
  UNet2DConditionConfig unet;
  unet.layers_per_block = {2, 2, 2, 2};
  CLIPTextConfig sd15_text;
  sd15_text.hidden_act = CLIPActivation::quick_gelu;
  const SingleFileLayout sd15 = single_file_layout(unet, AutoencoderKLConfig{}, sd15_text);
  EXPECT_EQ(sd15.text_encoder, LdmTextEncoder::clip_vit_l);
  EXPECT_EQ(sd15.unet.up_block_has_attention, (std::vector<bool>{false, true, true, true}));
  unet.layers_per_block = {2, 1, 2, 2};
  EXPECT_THROW(single_file_layout(unet, AutoencoderKLConfig{}, sd15_text), std::invalid_argument);
}

}  // namespace
}  // namespace sdtrain::models
