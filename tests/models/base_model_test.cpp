// Opening a base model (include/sdtrain/models/base_model.h): a single file loads the tensors a
// diffusers folder of the same model holds, bit for bit; its EMA copy on request; and every
// file that is not an SD 1.x/2.x single file is refused naming what it is and the fix.
#include "sdtrain/models/base_model.h"

#include <gtest/gtest.h>

#include <fstream>

#include "sdtrain/models/single_file.h"
#include "sdtrain/text/clip_tokenizer.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace sdtrain::models {
namespace {

namespace fs = std::filesystem;

fs::path demo_model() { return testing::source_dir() / "configs" / "demo" / "model"; }

std::map<std::string, io::NamedTensors> load_all(const io::ModelFolder& folder) {
  const LoadOptions fp32{torch::kFloat, torch::kCPU};
  return {{"unet", state_dict(*load_unet(folder, fp32, ""))},
          {"vae", state_dict(*load_vae(folder, fp32, ""))},
          {"text_encoder", state_dict(*load_text_encoder(folder, fp32, ""))}};
}

// The demo model as one single file (plus `extra` tensors), in this test's scratch folder.
fs::path demo_single_file(const io::NamedTensors& extra = {}) {
  const io::ModelFolder folder(demo_model());
  io::NamedTensors tensors = to_single_file(load_all(folder), single_file_layout(folder));
  tensors.insert(tensors.end(), extra.begin(), extra.end());
  const fs::path path = testing::scratch_dir() / "demo.safetensors";
  io::save_safetensors(path, tensors);
  return path;
}

SingleFileOptions with_demo_config() {
  SingleFileOptions options;
  options.single_file_config = demo_model().string();
  return options;
}

TEST(BaseModel, ASingleFileLoadsTheFoldersTensorsBitForBit) {
  const io::ModelFolder base = open_base_model(demo_single_file(), with_demo_config());
  ASSERT_NE(base.single_file(), nullptr);
  EXPECT_EQ(base.source().filename(), "demo.safetensors");
  const auto expected = load_all(io::ModelFolder(demo_model()));
  for (const auto& [component, tensors] : load_all(base)) {
    const auto& want = expected.at(component);
    ASSERT_EQ(tensors.size(), want.size()) << component;
    for (size_t i = 0; i < tensors.size(); ++i) {
      EXPECT_EQ(tensors[i].first, want[i].first);
      EXPECT_TRUE(torch::equal(tensors[i].second, want[i].second))
          << component << "." << want[i].first;
    }
  }
  std::map<std::string, io::NamedTensors> components;
  add_base_components(base, "", components);
  EXPECT_EQ(components.size(), 3u);
}

TEST(BaseModel, TheEMACopyIsUsedOnlyWhenAskedFor) {
  // LDM keeps the EMA UNet as model_ema.<name without dots>: here the weights plus one.
  const io::ModelFolder folder(demo_model());
  io::NamedTensors ema;
  const io::NamedTensors unet = load_all(folder).at("unet");
  for (const auto& [key, tensor] : to_single_file({{"unet", unet}}, single_file_layout(folder)))
    ema.emplace_back(ldm_ema_key(key), tensor + 1);
  EXPECT_EQ(ema.front().first.rfind("model_ema.diffusion_model", 0), 0u) << ema.front().first;
  const fs::path file = demo_single_file(ema);

  const io::ModelFolder plain = open_base_model(file, with_demo_config());
  EXPECT_NE(plain.single_file()->notes.front().find("not used"), std::string::npos);
  SingleFileOptions options = with_demo_config();
  options.use_ema_weights = true;
  const io::ModelFolder from_ema = open_base_model(file, options);
  const LoadOptions fp32{torch::kFloat, torch::kCPU};
  const auto loaded = state_dict(*load_unet(from_ema, fp32, ""));
  const auto base = state_dict(*load_unet(plain, fp32, ""));
  for (size_t i = 0; i < loaded.size(); ++i) {
    EXPECT_TRUE(torch::equal(loaded[i].second, unet[i].second + 1)) << loaded[i].first;
    EXPECT_TRUE(torch::equal(base[i].second, unet[i].second)) << base[i].first;
  }
  // Asked for where there is none: a configuration error naming the key.
  options.use_ema_weights = true;
  try {
    open_base_model(demo_single_file(), options);
    FAIL() << "no error";
  } catch (const ConfigError& error) {
    EXPECT_NE(std::string(error.what()).find("use_ema_weights"), std::string::npos) << error.what();
  }
}

TEST(BaseModel, ABuiltConfigFolderHasTheBundledTokenizer) {
  // The tiny model cannot be built from its shapes (its heads are not SD's): the error says so.
  testing::expect_model_error([] { open_base_model(demo_single_file()); },
                              {"demo.safetensors", "single_file_config"});
  // A file at SD's widths can: a one-level UNet, VAE and text tower of 64 channels.
  io::NamedTensors tensors;
  auto add = [&](const std::string& key, std::vector<int64_t> shape) {
    tensors.emplace_back(key, torch::zeros(shape));
  };
  const std::string u = "model.diffusion_model.";
  add(u + "input_blocks.0.0.weight", {64, 4, 3, 3});
  add(u + "input_blocks.1.0.in_layers.2.weight", {64, 64, 3, 3});
  add(u + "input_blocks.1.0.out_layers.3.weight", {64, 64, 3, 3});
  add(u + "middle_block.1.proj_in.weight", {64, 64});
  add(u + "middle_block.1.transformer_blocks.0.attn1.to_q.weight", {64, 64});
  add(u + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", {64, 1024});
  add(u + "out.2.weight", {4, 64, 3, 3});
  add("first_stage_model.encoder.conv_in.weight", {64, 3, 3, 3});
  add("first_stage_model.encoder.down.0.block.0.conv1.weight", {64, 64, 3, 3});
  add("first_stage_model.encoder.down.0.block.0.conv2.weight", {64, 64, 3, 3});
  add("first_stage_model.decoder.conv_in.weight", {64, 4, 3, 3});
  add("first_stage_model.decoder.conv_out.weight", {3, 64, 3, 3});
  add("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", {192, 64});
  add("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight", {256, 64});
  add("cond_stage_model.model.token_embedding.weight", {49408, 64});
  add("cond_stage_model.model.positional_embedding", {77, 64});
  const fs::path file = testing::scratch_dir() / "sd2-shaped.safetensors";
  io::save_safetensors(file, tensors);
  fs::path generated;
  {
    const io::ModelFolder base = open_base_model(file);
    EXPECT_EQ(base.config("unet")["block_out_channels"], nlohmann::json({64}));
    EXPECT_EQ(base.config("unet")["attention_head_dim"], nlohmann::json({1}));
    EXPECT_EQ(base.config("text_encoder")["num_hidden_layers"], 1);
    EXPECT_EQ(base.config("scheduler")["prediction_type"], "epsilon");
    const auto tokenizer = text::CLIPTokenizer::from_folder(base.require("tokenizer").dir);
    EXPECT_EQ(tokenizer.pad_id(), 0);  // SD 2.x pads with "!"
    EXPECT_EQ(tokenizer.vocab_size(), 49408);
    generated = base.root();
    EXPECT_TRUE(fs::exists(generated / "model_index.json"));
  }
  EXPECT_FALSE(fs::exists(generated));  // removed with the last ModelFolder holding it
}

TEST(BaseModel, FilesThatAreNotABaseAreRefusedSayingWhatTheyAre) {
  const fs::path dir = testing::scratch_dir();
  std::ofstream(dir / "model.ckpt") << "not read";
  testing::expect_model_error([&] { open_base_model(dir / "model.ckpt"); },
                              {"model.ckpt", "pickle", "run any code"});
  std::ofstream(dir / "notes.txt") << "x";
  testing::expect_model_error([&] { open_base_model(dir / "notes.txt"); },
                              {"notes.txt", "not a .safetensors"});
  auto write = [&](const std::string& name, const std::string& key) {
    io::save_safetensors(dir / name, {{key, torch::zeros({2, 2})}});
    return dir / name;
  };
  testing::expect_model_error(
      [&] {
        open_base_model(write("lora.safetensors",
                              "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"));
      },
      {"lora.safetensors", "LoRA", "generate --lora"});
  testing::expect_model_error(
      [&] {
        open_base_model(
            write("xl.safetensors", "conditioner.embedders.0.transformer.text_model.x"));
      },
      {"xl.safetensors", "XL", "not supported"});
  testing::expect_model_error(
      [&] { open_base_model(write("sd3.safetensors", "model.diffusion_model.joint_blocks.0.x")); },
      {"sd3.safetensors", "Stable Diffusion 3"});
  testing::expect_model_error([&] { open_base_model(write("other.safetensors", "weight")); },
                              {"other.safetensors", "not a Stable Diffusion"});
}

TEST(BaseModel, SingleFileKeysWithAFolderAreAConfigError) {
  SingleFileOptions options;
  options.single_file_prediction_type = "v_prediction";
  EXPECT_THROW(open_base_model(demo_model(), options), ConfigError);
  EXPECT_THROW(open_base_model(demo_model(), with_demo_config()), ConfigError);
  // With a config folder the folder's scheduler says the prediction type: both is a conflict.
  SingleFileOptions both = with_demo_config();
  both.single_file_prediction_type = "epsilon";
  EXPECT_THROW(open_base_model(demo_single_file(), both), ConfigError);
}

}  // namespace
}  // namespace sdtrain::models
