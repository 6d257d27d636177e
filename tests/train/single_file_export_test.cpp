// save_format (docs/single_file.md): a full run writes its model as one file in the original
// LDM layout beside (or instead of) the diffusers folder. The file holds the same tensors as the
// folder, bit for bit in fp32, read back with sdtrain's rules and with diffusers'
// from_single_file; a LoRA run refuses the key.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/single_file.h"
#include "sdtrain/models/state_dict.h"
#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;

namespace {

using sdtrain::testing::run_sdtrain;

std::map<std::string, sdtrain::io::NamedTensors> folder_tensors(const fs::path& folder_path) {
  const sdtrain::io::ModelFolder folder(folder_path);
  const sdtrain::models::LoadOptions fp32{torch::kFloat, torch::kCPU};
  return {{"unet", sdtrain::models::state_dict(*sdtrain::models::load_unet(folder, fp32, ""))},
          {"vae", sdtrain::models::state_dict(*sdtrain::models::load_vae(folder, fp32, ""))},
          {"text_encoder", sdtrain::models::state_dict(*sdtrain::models::load_text_encoder(folder, fp32, ""))}};
}

TEST(SingleFileExport, TheFileHoldsTheFoldersTensorsBitForBit) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const auto config =
      sdtrain::testing::write_config(dir, {{"max_steps", 2}, {"train_text_encoder", true}, {"save_format", "both"}});
  const auto run = run_sdtrain("--config " + config.string());
  ASSERT_EQ(run.code, 0) << run.output;
  const fs::path out = dir / "out";
  ASSERT_TRUE(fs::exists(out / "model_index.json"));
  const sdtrain::io::SafetensorsFile file(out / "model.safetensors");
  const sdtrain::io::ModelFolder folder(out);
  const auto layout = sdtrain::models::single_file_layout(
      sdtrain::models::UNet2DConditionConfig::from_json(folder.config("unet")),
      sdtrain::models::AutoencoderKLConfig::from_json(folder.config("vae")),
      sdtrain::models::CLIPTextConfig::from_json(folder.config("text_encoder"), "text_encoder/config.json"));
  for (const auto& [component, tensors] : folder_tensors(out)) {
    const auto back = sdtrain::models::from_single_file(file, component, tensors, layout);
    ASSERT_EQ(back.size(), tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i)
      EXPECT_TRUE(torch::equal(back[i].second, tensors[i].second)) << component << "." << tensors[i].first;
  }
  if (sdtrain::testing::reference_python().empty()) GTEST_SKIP() << "no reference Python environment";
  std::string output;
  const int code = sdtrain::testing::run_command(
      sdtrain::testing::reference_python() + " " +
          (sdtrain::testing::source_dir() / "tools" / "check_single_file.py").string() + " --file " +
          (out / "model.safetensors").string() + " --folder " + out.string(),
      &output);
  ASSERT_EQ(code, 0) << output;
  const auto report = nlohmann::json::parse(output.substr(output.rfind("\n{") == std::string::npos ? 0 : output.rfind("\n{") + 1));
  for (const auto& [component, stats] : report["components"].items()) {
    EXPECT_GT(stats["compared"].get<int>(), 0) << component;
    EXPECT_TRUE(stats["different"].empty()) << component << ": " << stats.dump();
    EXPECT_TRUE(stats["only_single_file"].empty()) << component << ": " << stats.dump();
    EXPECT_TRUE(stats["only_folder"].empty()) << component << ": " << stats.dump();
  }
}

TEST(SingleFileExport, SingleFileAloneAndLoRARunsRefusingIt) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const auto alone = run_sdtrain(
      "--config " + sdtrain::testing::write_config(dir, {{"max_steps", 1}, {"save_format", "single_file"}}).string());
  ASSERT_EQ(alone.code, 0) << alone.output;
  EXPECT_TRUE(fs::exists(dir / "out" / "model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "out" / "model_index.json"));
  const fs::path lora_dir = sdtrain::testing::scratch_dir() / "lora";
  fs::create_directories(lora_dir);
  const auto lora = run_sdtrain(
      "--config " +
      sdtrain::testing::write_config(lora_dir, {{"train_mode", "lora"}, {"save_format", "both"}}).string());
  EXPECT_EQ(lora.code, 1) << lora.output;
  EXPECT_NE(lora.output.find("lora_formats"), std::string::npos) << lora.output;
}

}  // namespace
