// The bundled demo end to end (what `scripts/demo.sh` runs): class images generated, the loss
// falls, validation grids and checkpoints written, and the output folder is a diffusers folder:
// StableDiffusionPipeline.from_pretrained loads it without a missing/unexpected-weight warning,
// and `sdtrain generate` on it gives diffusers' image for the same prompt and seed.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <numeric>
#include <regex>

#include "sdtrain/io/safetensors.h"
#include "test_support.h"

namespace fs = std::filesystem;
using sdtrain::testing::run_command;

namespace {

std::string quoted(const fs::path& path) { return "'" + path.string() + "'"; }

int sdtrain(const std::string& args, std::string* output) {
  return run_command(sdtrain::testing::sdtrain_exe() + " " + args, output);
}

nlohmann::json check_with_diffusers(const std::string& args) {
  std::string output;
  const int code = run_command(sdtrain::testing::reference_python() + " " +
                                   quoted(sdtrain::testing::source_dir() / "tools" / "check_exported_pipeline.py") +
                                   " " + args,
                               &output);
  EXPECT_EQ(code, 0) << output;
  // The report is the last line; the libraries' own log lines come before it.
  const size_t start = output.rfind("\n{");
  return nlohmann::json::parse(start == std::string::npos ? output : output.substr(start + 1));
}

// Warnings diffusers and transformers log when a checkpoint's keys do not fit the model.
std::vector<std::string> weight_warnings(const nlohmann::json& report) {
  std::vector<std::string> found;
  for (const auto& warning : report["warnings"]) {
    const std::string text = warning.get<std::string>();
    for (const char* marker : {"LOAD REPORT", "were not used", "newly initialized", "MISSING", "UNEXPECTED"}) {
      if (text.find(marker) != std::string::npos) {
        found.push_back(text);
        break;
      }
    }
  }
  return found;
}

std::vector<double> losses(const fs::path& metrics) {
  std::vector<double> values;
  std::ifstream lines(metrics);
  std::string line;
  while (std::getline(lines, line)) values.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return values;
}

double mean(const std::vector<double>& values, size_t first, size_t count) {
  return std::accumulate(values.begin() + first, values.begin() + first + count, 0.0) / count;
}

TEST(Demo, TrainsLoadsInDiffusersAndGeneratesItsImages) {
  if (sdtrain::testing::reference_python().empty()) GTEST_SKIP() << "no reference Python environment";
  const fs::path out = sdtrain::testing::scratch_dir() / "demo";
  std::string log;
  const fs::path config = sdtrain::testing::source_dir() / "configs" / "demo.json";
  ASSERT_EQ(sdtrain("--config " + quoted(config) + " --set output_dir=" + quoted(out), &log), 0) << log;

  // Prior preservation generated the 4 class images; checkpoints and validation grids exist.
  EXPECT_TRUE(fs::exists(out / "class_images" / "class-000003.png")) << log;
  // A checkpoint's UNet is a diffusers component folder on its own.
  const nlohmann::json checkpoint_unet = check_with_diffusers("--unet " + quoted(out / "checkpoint-20" / "unet"));
  EXPECT_TRUE(weight_warnings(checkpoint_unet).empty()) << checkpoint_unet.dump(2);
  EXPECT_EQ(checkpoint_unet["parameters"].get<int64_t>(), 2164452);
  EXPECT_TRUE(fs::exists(out / "samples" / "step-20.png"));
  EXPECT_TRUE(fs::exists(out / "samples" / "step-40.png"));
  // Their log lines give their time, which the metrics' step seconds leave out.
  EXPECT_TRUE(std::regex_search(log, std::regex("saved \\S*checkpoint-20 in [0-9.e-]+ s"))) << log;
  EXPECT_TRUE(
      std::regex_search(log, std::regex("validation images: \\S*step-20.png in [0-9.e-]+ s")))
      << log;

  // The loss falls: the last ten steps' mean is below the first ten's (a random UNet starts
  // far from the noise it must predict).
  const std::vector<double> values = losses(out / "logs" / "metrics.jsonl");
  ASSERT_EQ(values.size(), 40u);
  EXPECT_LT(mean(values, 30, 10), 0.9 * mean(values, 0, 10));

  // `sdtrain generate` on the trained folder, then diffusers on the same folder.
  const std::string prompt = "a photo of sks robot";
  ASSERT_EQ(sdtrain("generate -m " + quoted(out) + " -p '" + prompt + "' --steps 10 --seed 3 --width 64 --height 64 -o " +
                        quoted(out / "generated"),
                    &log),
            0)
      << log;
  const nlohmann::json report = check_with_diffusers("--model " + quoted(out) + " --image " +
                                                     quoted(out / "generated" / "s3-0000.png") + " --prompt '" +
                                                     prompt + "' --seed 3 --steps 10");
  EXPECT_TRUE(weight_warnings(report).empty()) << report.dump(2);
  EXPECT_EQ(report["dtypes"]["unet"], "torch.float32");
  // fp32 on the CPU: the pipelines agree to ~1e-6 before rounding to 8 bits (pipeline tests),
  // so at most a rounding tie apart.
  EXPECT_LE(report["max_pixel_diff"].get<int>(), 1) << report.dump(2);
  EXPECT_LE(report["fraction_pixels_differing"].get<double>(), 0.01) << report.dump(2);

  // The same check flags a folder whose weights do not fit (so its silence above means something).
  const fs::path broken = out.parent_path() / "broken";
  fs::copy(out, broken, fs::copy_options::recursive);
  sdtrain::io::NamedTensors tensors;
  {
    sdtrain::io::SafetensorsFile unet(broken / "unet" / "diffusion_pytorch_model.safetensors");
    for (const auto& entry : unet.tensors()) tensors.emplace_back(entry.name, unet.tensor(entry.name).clone());
  }
  tensors.emplace_back("bogus.weight", torch::zeros({3}));
  sdtrain::io::save_safetensors(broken / "unet" / "diffusion_pytorch_model.safetensors", tensors);
  EXPECT_FALSE(weight_warnings(check_with_diffusers("--model " + quoted(broken))).empty());
}

}  // namespace
