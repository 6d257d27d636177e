// LoRA outputs and their use (docs/lora.md), on one short LoRA run of the bundled tiny model
// (UNet and text-encoder adapters, alpha 2 x rank so the scale is not 1):
//  * the written files have the diffusers and kohya layouts and metadata; checkpoints hold
//    only adapters;
//  * both files load in diffusers' load_lora_weights without a key warning, and the pipeline's
//    image equals `sdtrain generate --lora`'s;
//  * `generate --jobs` gives the images of separate runs and loads the base once; a bad line
//    fails alone;
//  * `merge-lora` gives the image of base + adapter; adapters that do not fit exit 3.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/io/image.h"
#include "sdtrain/io/safetensors.h"
#include "test_support.h"
#include "../train/train_support.h"

namespace fs = std::filesystem;

namespace {

using sdtrain::testing::CommandResult;
using sdtrain::testing::run_command;
using sdtrain::testing::run_sdtrain;

std::string quoted(const fs::path& path) { return "'" + path.string() + "'"; }
fs::path base_model() { return sdtrain::testing::demo() / "model"; }

// Each test trains its own short run (ctest runs every test in a process of its own, so a
// suite-wide run would be repeated anyway, into a shared folder).
class LoRAOutputs : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = sdtrain::testing::scratch_dir();
    const fs::path config = sdtrain::testing::write_config(dir_, {{"train_mode", "lora"},
                                                                  {"lora_rank", 4},
                                                                  {"lora_alpha", 8},
                                                                  {"lora_formats", {"diffusers", "kohya"}},
                                                                  {"train_text_encoder", true},
                                                                  {"learning_rate", 1e-2},
                                                                  {"checkpointing_steps", 3},
                                                                  {"max_steps", 6}});
    const CommandResult run = run_sdtrain("--config " + config.string());
    ASSERT_EQ(run.code, 0) << run.output;
  }

  fs::path out() const { return dir_ / "out"; }
  fs::path diffusers_file() const { return out() / "pytorch_lora_weights.safetensors"; }
  fs::path kohya_file() const { return out() / "lora_kohya.safetensors"; }

  // `sdtrain generate` on the demo base, 64x64, 5 steps; extra arguments appended.
  static CommandResult generate(const fs::path& out_dir, const std::string& extra, const std::string& model = "") {
    return run_sdtrain("generate -m " + quoted(model.empty() ? base_model() : fs::path(model)) +
                       " -p 'a photo of sks robot' --steps 5 --seed 3 --width 64 --height 64 -o " + quoted(out_dir) +
                       " " + extra);
  }

  fs::path dir_;
};

torch::Tensor pixels(const fs::path& png) {
  const sdtrain::io::Image image = sdtrain::io::read_image(png);
  return torch::from_blob(const_cast<uint8_t*>(image.rgb.data()),
                          {static_cast<int64_t>(image.rgb.size())}, torch::kUInt8)
      .to(torch::kInt);
}

int max_pixel_diff(const fs::path& a, const fs::path& b) {
  return (pixels(a) - pixels(b)).abs().max().item<int>();
}

TEST_F(LoRAOutputs, FilesHaveBothLayoutsAndCheckpointsHoldOnlyAdapters) {
  sdtrain::io::SafetensorsFile diffusers(diffusers_file());
  sdtrain::io::SafetensorsFile kohya(kohya_file());
  int unet = 0, text = 0;
  for (const auto& entry : diffusers.tensors()) {
    unet += entry.name.starts_with("unet.") && entry.name.ends_with(".lora_A.weight");
    text += entry.name.starts_with("text_encoder.text_model.") && entry.name.ends_with(".lora_A.weight");
  }
  EXPECT_GT(unet, 0);
  EXPECT_GT(text, 0);
  ASSERT_NE(diffusers.find("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"), nullptr);
  EXPECT_EQ(diffusers.find("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")->shape[0], 4);
  // Three tensors per adapter in kohya's layout: down, up, alpha.
  EXPECT_EQ(kohya.tensors().size(), 3 * static_cast<size_t>(unet + text));
  const std::string name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
  ASSERT_NE(kohya.find(name + ".alpha"), nullptr);
  EXPECT_FLOAT_EQ(kohya.tensor(name + ".alpha").item<float>(), 8.0f);
  EXPECT_TRUE(torch::equal(kohya.tensor(name + ".lora_down.weight"),
                           diffusers.tensor("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight")));
  EXPECT_NE(kohya.find("lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight"), nullptr);
  const auto metadata = nlohmann::json::parse(diffusers.metadata().at("lora_adapter_metadata"));
  EXPECT_EQ(metadata["unet.r"], 4);
  EXPECT_EQ(metadata["unet.lora_alpha"], 8.0);
  EXPECT_EQ(metadata["text_encoder.r"], 4);
  for (const auto* file : {&diffusers, &kohya}) {
    EXPECT_FALSE(file->metadata().at("sdtrain_version").empty());
    EXPECT_EQ(file->metadata().at("sdtrain_lora_rank"), "4");
    EXPECT_EQ(file->metadata().at("sdtrain_instance_prompt"), "a photo of sks robot");
  }
  EXPECT_EQ(kohya.metadata().at("ss_network_dim"), "4");
  // The checkpoint: adapters and optimizer state, no model folders.
  const fs::path checkpoint = out() / "checkpoint-3";
  EXPECT_TRUE(fs::exists(checkpoint / "pytorch_lora_weights.safetensors"));
  EXPECT_FALSE(fs::exists(checkpoint / "unet"));
  EXPECT_FALSE(fs::exists(checkpoint / "text_encoder"));
  EXPECT_FALSE(fs::exists(out() / "model_index.json"));
}

// Warnings diffusers, transformers or peft give when a LoRA file's keys do not fit the model.
std::vector<std::string> key_warnings(const nlohmann::json& report) {
  std::vector<std::string> found;
  for (const auto& warning : report["warnings"]) {
    std::string text = warning.get<std::string>();
    std::transform(text.begin(), text.end(), text.begin(), ::tolower);
    for (const char* marker : {"unexpected key", "load report", "missing", "not found in the model", "were not used", "incompatible"}) {
      if (text.find(marker) != std::string::npos) {
        found.push_back(warning.get<std::string>());
        break;
      }
    }
  }
  return found;
}

nlohmann::json diffusers_with_lora(const fs::path& lora, const fs::path& image, double scale) {
  std::string output;
  const int code = run_command(sdtrain::testing::reference_python() + " " +
                                   quoted(sdtrain::testing::source_dir() / "tools" / "check_exported_pipeline.py") +
                                   " --model " + quoted(base_model()) + " --lora " + quoted(lora) + " --lora-scale " +
                                   std::to_string(scale) + " --image " + quoted(image) +
                                   " --prompt 'a photo of sks robot' --seed 3 --steps 5",
                               &output);
  EXPECT_EQ(code, 0) << output;
  const size_t start = output.rfind("\n{");
  return nlohmann::json::parse(start == std::string::npos ? output : output.substr(start + 1));
}

TEST_F(LoRAOutputs, BothFilesLoadInDiffusersAndGiveSdtrainsImage) {
  if (sdtrain::testing::reference_python().empty()) GTEST_SKIP() << "no reference Python environment";
  const fs::path images = dir_ / "images";
  ASSERT_EQ(generate(images / "base", "").code, 0);
  for (const auto& [file, scale] : {std::pair{diffusers_file(), 1.0}, std::pair{kohya_file(), 1.0},
                                    std::pair{diffusers_file(), 0.5}}) {
    const fs::path ours = images / (file.stem().string() + "-" + std::to_string(scale));
    const CommandResult run = generate(ours, "--lora " + quoted(file) + ":" + std::to_string(scale));
    ASSERT_EQ(run.code, 0) << run.output;
    // The adapters change the image (so the comparison below says something about them).
    EXPECT_GT(max_pixel_diff(ours / "s3-0000.png", images / "base" / "s3-0000.png"), 8) << file;
    const nlohmann::json report = diffusers_with_lora(file, ours / "s3-0000.png", scale);
    EXPECT_TRUE(key_warnings(report).empty()) << file << ": " << report.dump(2);
    // fp32 on the CPU: the same operations as peft's layers up to summation order (the
    // adapter's output is added to the base layer's, as peft), ~1e-6 relative before the
    // 8-bit rounding: at most a rounding tie apart, on few pixels.
    EXPECT_LE(report["max_pixel_diff"].get<int>(), 1) << file << ": " << report.dump(2);
    EXPECT_LE(report["fraction_pixels_differing"].get<double>(), 0.01) << file << ": " << report.dump(2);
  }
}

TEST_F(LoRAOutputs, JobsGiveTheImagesOfSeparateRunsOnOneLoadedBase) {
  const fs::path jobs_dir = dir_ / "jobs";
  fs::create_directories(jobs_dir);
  std::ofstream(jobs_dir / "jobs.jsonl")
      << nlohmann::json({{"prompt", "a photo of sks robot"}, {"seed", 3}, {"out", "one"}, {"lora", diffusers_file().string()}}).dump()
      << "\n"
      << nlohmann::json({{"prompt", "a photo of sks robot"}, {"seed", 3}, {"out", "two"}, {"lora", kohya_file().string()}, {"scale", 0.5}}).dump()
      << "\n\n"
      << nlohmann::json({{"prompt", "a photo of sks robot"}, {"seed", 3}, {"out", "plain"}}).dump() << "\n";
  const CommandResult jobs = generate(jobs_dir / "unused", "--jobs " + quoted(jobs_dir / "jobs.jsonl"));
  ASSERT_EQ(jobs.code, 0) << jobs.output;
  size_t loads = 0;
  for (size_t at = jobs.output.find("loaded the base model"); at != std::string::npos;
       at = jobs.output.find("loaded the base model", at + 1))
    ++loads;
  EXPECT_EQ(loads, 1u) << jobs.output;
  EXPECT_NE(jobs.output.find("(adapter swap)"), std::string::npos) << jobs.output;

  const fs::path separate = dir_ / "separate";
  ASSERT_EQ(generate(separate / "one", "--lora " + quoted(diffusers_file())).code, 0);
  ASSERT_EQ(generate(separate / "two", "--lora " + quoted(kohya_file()) + ":0.5").code, 0);
  ASSERT_EQ(generate(separate / "plain", "").code, 0);
  for (const char* name : {"one", "two", "plain"}) {
    EXPECT_EQ(max_pixel_diff(jobs_dir / name / "s3-0000.png", separate / name / "s3-0000.png"), 0) << name;
  }
  EXPECT_GT(max_pixel_diff(separate / "one" / "s3-0000.png", separate / "plain" / "s3-0000.png"), 8);
}

TEST_F(LoRAOutputs, AnInvalidJobLineFailsAloneWithItsLineNumber) {
  const fs::path jobs_dir = dir_ / "bad-jobs";
  fs::create_directories(jobs_dir);
  std::ofstream(jobs_dir / "jobs.jsonl") << "{not json\n"
                                          << nlohmann::json({{"prompt", "a photo"}, {"out", "fine"}}).dump() << "\n"
                                          << nlohmann::json({{"prompt", "a photo"}, {"out", "x"}, {"lora", "missing.safetensors"}}).dump()
                                          << "\n";
  const CommandResult run = generate(jobs_dir / "unused", "--jobs " + quoted(jobs_dir / "jobs.jsonl"));
  EXPECT_EQ(run.code, 1) << run.output;  // the first failure: line 1, a usage error
  EXPECT_NE(run.output.find("jobs.jsonl:1: job failed"), std::string::npos) << run.output;
  EXPECT_NE(run.output.find("jobs.jsonl:3: job failed"), std::string::npos) << run.output;
  EXPECT_TRUE(fs::exists(jobs_dir / "fine" / "s3-0000.png") || fs::exists(jobs_dir / "fine" / "s0-0000.png"));
}

TEST_F(LoRAOutputs, MergedModelGivesTheImageOfBasePlusAdapter) {
  const fs::path merged = dir_ / "merged";
  const CommandResult merge = run_sdtrain("merge-lora -m " + quoted(base_model()) + " --lora " +
                                          quoted(diffusers_file()) + " -o " + quoted(merged));
  ASSERT_EQ(merge.code, 0) << merge.output;
  ASSERT_EQ(generate(dir_ / "merged-images", "", merged.string()).code, 0);
  ASSERT_EQ(generate(dir_ / "adapter-images", "--lora " + quoted(diffusers_file())).code, 0);
  // W + s·BA formed once in fp32 against W·x + s·B(A·x): the same sums in another order,
  // ~1e-6 relative; after 8-bit rounding at most one level apart.
  EXPECT_LE(max_pixel_diff(dir_ / "merged-images" / "s3-0000.png", dir_ / "adapter-images" / "s3-0000.png"), 1);
}

// diffusers' convert_state_dict_to_kohya spells the text encoder "lora_te1_"; such a file is the
// same adapter.
TEST_F(LoRAOutputs, KohyaFilesWithTheTe1PrefixAreRead) {
  sdtrain::io::NamedTensors renamed;
  {
    sdtrain::io::SafetensorsFile kohya(kohya_file());
    for (const auto& entry : kohya.tensors()) {
      std::string name = entry.name;
      if (name.starts_with("lora_te_")) name = "lora_te1_" + name.substr(8);
      renamed.emplace_back(name, kohya.tensor(entry.name).clone());
    }
  }
  sdtrain::io::save_safetensors(dir_ / "te1.safetensors", renamed);
  ASSERT_EQ(generate(dir_ / "te1", "--lora " + quoted(dir_ / "te1.safetensors")).code, 0);
  ASSERT_EQ(generate(dir_ / "te", "--lora " + quoted(kohya_file())).code, 0);
  EXPECT_EQ(max_pixel_diff(dir_ / "te1" / "s3-0000.png", dir_ / "te" / "s3-0000.png"), 0);
}

TEST_F(LoRAOutputs, AdaptersThatDoNotFitTheBaseExitWith3NamingTheKey) {
  const fs::path bad = dir_ / "bad";
  fs::create_directories(bad);
  const std::string key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight";
  // A wrong width (another model family), a layer the model lacks, another layout, a torn file.
  sdtrain::io::save_safetensors(bad / "wide.safetensors",
                                {{key, torch::zeros({4, 1024})},
                                 {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
                                  torch::zeros({32, 4})}});
  sdtrain::io::save_safetensors(bad / "layer.safetensors", {{"unet.no_such_block.to_q.lora_A.weight", torch::zeros({4, 4})},
                                                            {"unet.no_such_block.to_q.lora_B.weight", torch::zeros({4, 4})}});
  sdtrain::io::save_safetensors(bad / "layout.safetensors", {{"model.weight", torch::zeros({4})}});
  std::ofstream(bad / "torn.safetensors") << "\x10\x00\x00";
  const std::string layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
  for (const auto& [file, needle] : {std::pair{"wide.safetensors", layer}, std::pair{"layer.safetensors", std::string("no_such_block")},
                                     std::pair{"layout.safetensors", std::string("model.weight")},
                                     std::pair{"torn.safetensors", std::string("torn.safetensors")}}) {
    const CommandResult run = generate(bad / "out", "--lora " + quoted(bad / file));
    EXPECT_EQ(run.code, 3) << run.output;
    EXPECT_NE(run.output.find(needle), std::string::npos) << run.output;
    EXPECT_NE(run.output.find(file), std::string::npos) << run.output;
  }
}

}  // namespace
