// save_format (docs/single_file.md): a full run writes its model as one file in the original
// LDM layout beside (or instead of) the diffusers folder. The file holds the same tensors as the
// folder, bit for bit in fp32, read back with sdtrain's rules and with diffusers'
// from_single_file; a LoRA run refuses the key.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/single_file.h"
#include "sdtrain/models/single_file_config.h"
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
  const auto layout = sdtrain::models::single_file_layout(folder);
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

std::vector<double> losses(const fs::path& output_dir) {
  std::vector<double> values;
  std::ifstream in(output_dir / "logs" / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) values.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return values;
}

// The demo model as one single file in `dir` (sdtrain's own conversion, bit-exact in fp32).
fs::path demo_single_file(const fs::path& dir) {
  const fs::path model = sdtrain::testing::demo() / "model";
  const sdtrain::io::ModelFolder folder(model);
  const auto layout = sdtrain::models::single_file_layout(folder);
  const fs::path path = dir / "demo.safetensors";
  sdtrain::io::save_safetensors(path, sdtrain::models::to_single_file(folder_tensors(model), layout));
  return path;
}

TEST(SingleFileBase, TrainingFromASingleFileGivesTheFoldersFirstTenLosses) {
  const fs::path folder_dir = sdtrain::testing::scratch_dir() / "folder";
  const fs::path file_dir = sdtrain::testing::scratch_dir() / "file";
  fs::create_directories(folder_dir);
  fs::create_directories(file_dir);
  const nlohmann::json common = {{"max_steps", 10}, {"train_text_encoder", true}, {"with_prior_preservation", true},
                                 {"num_class_images", 4}};
  const auto from_folder = run_sdtrain("--config " + sdtrain::testing::write_config(folder_dir, common).string());
  ASSERT_EQ(from_folder.code, 0) << from_folder.output;
  nlohmann::json file_config = common;
  file_config["pretrained_model_name_or_path"] = demo_single_file(file_dir).string();
  file_config["single_file_config"] = (sdtrain::testing::demo() / "model").string();
  const auto from_file = run_sdtrain("--config " + sdtrain::testing::write_config(file_dir, file_config).string());
  ASSERT_EQ(from_file.code, 0) << from_file.output;
  EXPECT_NE(from_file.output.find("single file: configs and tokenizer from single_file_config"), std::string::npos)
      << from_file.output;
  const auto expected = losses(folder_dir / "out");
  ASSERT_EQ(expected.size(), 10u);
  EXPECT_EQ(losses(file_dir / "out"), expected);  // exactly: the same tensors, the same run
  // The diffusers folder written from a single-file base holds every component.
  const sdtrain::io::ModelFolder written(file_dir / "out");
  EXPECT_EQ(folder_tensors(file_dir / "out").at("vae").size(), folder_tensors(folder_dir / "out").at("vae").size());
  EXPECT_TRUE(fs::exists(file_dir / "out" / "tokenizer" / "vocab.json"));
}

TEST(SingleFileBase, GenerateFromASingleFileDrawsTheFoldersImage) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path file = demo_single_file(dir);
  const std::string common = " --prompt 'a photo of sks robot' --steps 3 --seed 5 --width 64 --height 64 --device cpu";
  const auto a = run_sdtrain("generate --model " + (sdtrain::testing::demo() / "model").string() + common +
                             " --out " + (dir / "a").string());
  ASSERT_EQ(a.code, 0) << a.output;
  const auto b = run_sdtrain("generate --model " + file.string() + " --single-file-config " +
                             (sdtrain::testing::demo() / "model").string() + common + " --out " + (dir / "b").string());
  ASSERT_EQ(b.code, 0) << b.output;
  std::ifstream ia(dir / "a" / "s5-0000.png", std::ios::binary), ib(dir / "b" / "s5-0000.png", std::ios::binary);
  const std::string png_a((std::istreambuf_iterator<char>(ia)), {}), png_b((std::istreambuf_iterator<char>(ib)), {});
  // The pixels (from the IDAT chunk on); the text chunks before it name each --model.
  ASSERT_NE(png_a.find("IDAT"), std::string::npos);
  ASSERT_NE(png_b.find("IDAT"), std::string::npos);
  EXPECT_TRUE(png_a.substr(png_a.find("IDAT")) == png_b.substr(png_b.find("IDAT")));
  // Without the config folder the tiny model cannot be built from its shapes: exit 3 naming the fix.
  const auto c = run_sdtrain("generate --model " + file.string() + common + " --out " + (dir / "c").string());
  EXPECT_EQ(c.code, 3) << c.output;
  EXPECT_NE(c.output.find("single_file_config"), std::string::npos) << c.output;
}

TEST(SingleFileExport, AVPredictionModelGetsItsSidecar) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  // The demo model with a v-prediction scheduler.
  const fs::path model = dir / "v-model";
  fs::copy(sdtrain::testing::demo() / "model", model, fs::copy_options::recursive);
  nlohmann::json scheduler = nlohmann::json::parse(std::ifstream(model / "scheduler" / "scheduler_config.json"));
  scheduler["prediction_type"] = "v_prediction";
  std::ofstream(model / "scheduler" / "scheduler_config.json") << scheduler.dump(2);
  const auto run = run_sdtrain("--config " + sdtrain::testing::write_config(dir, {{"max_steps", 1},
                                                                                  {"pretrained_model_name_or_path", model.string()},
                                                                                  {"save_format", "single_file"}})
                                                 .string());
  ASSERT_EQ(run.code, 0) << run.output;
  const auto sidecar = sdtrain::models::read_ldm_sidecar(dir / "out" / "model.safetensors");
  ASSERT_TRUE(sidecar);
  EXPECT_EQ(sidecar->path.filename(), "model.yaml");
  EXPECT_EQ(sidecar->prediction_type, "v_prediction");
}

}  // namespace
