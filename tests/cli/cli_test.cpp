// The sdtrain executable as users and CI scripts meet it: exit codes and messages on bad input
// (README "Exit codes"), `inspect` against what the reference environment reports, dry runs.

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/util/atomic_file.h"
#include "test_support.h"

namespace fs = std::filesystem;
using sdtrain::testing::run_command;

namespace {

using Result = sdtrain::testing::CommandResult;

Result sdtrain_run(const std::string& args) { return sdtrain::testing::run_sdtrain(args); }

fs::path demo() { return sdtrain::testing::source_dir() / "configs" / "demo"; }

// A copy of the demo (model + photos) that a test may break.
fs::path copy_demo(const fs::path& dir) {
  fs::copy(demo(), dir / "demo", fs::copy_options::recursive);
  std::ofstream(dir / "config.json") << R"({"pretrained_model_name_or_path": "demo/model",
    "instance_data_dir": "demo/instance", "output_dir": "out", "resolution": 64, "device": "cpu",
    "with_prior_preservation": true, "num_class_images": 3})";
  return dir / "config.json";
}

void expect_contains(const Result& r, const std::string& text) {
  EXPECT_NE(r.output.find(text), std::string::npos) << "missing \"" << text << "\" in:\n" << r.output;
}

}  // namespace

TEST(Cli, VersionAndHelp) {
  auto version = sdtrain_run("--version");
  EXPECT_EQ(version.code, 0);
  expect_contains(version, "sdtrain ");
  auto help = sdtrain_run("--help");
  EXPECT_EQ(help.code, 0);
  expect_contains(help, "Exit codes");
  expect_contains(help, "inspect");
  EXPECT_EQ(sdtrain_run("").code, 1);
  EXPECT_EQ(sdtrain_run("--no-such-flag").code, 1);
}

TEST(Cli, DemoDryRunValidatesEverythingAndWritesNothing) {
  auto dir = sdtrain::testing::scratch_dir();
  auto config = copy_demo(dir);
  auto r = sdtrain_run("--config " + config.string() + " --dry-run");
  ASSERT_EQ(r.code, 0) << r.output;
  expect_contains(r, "instance images:  4");
  expect_contains(r, "a photo of sks robot");          // from dataset_info.json
  expect_contains(r, "3 to generate");
  EXPECT_FALSE(fs::exists(dir / "out"));
}

TEST(Cli, BundledDemoConfigPassesDryRun) {
  auto r = sdtrain_run("--config " + (sdtrain::testing::source_dir() / "configs" / "demo.json").string() + " --dry-run");
  EXPECT_EQ(r.code, 0) << r.output;
}

TEST(Cli, ConfigErrorsExitWithCode1) {
  auto dir = sdtrain::testing::scratch_dir();
  std::ofstream(dir / "typo.json") << R"({"pretrained_model_name_or_path": "m", "instance_data_dir": "i", "max_stesp": 3})";
  auto r = sdtrain_run("--config " + (dir / "typo.json").string() + " --dry-run");
  EXPECT_EQ(r.code, 1);
  expect_contains(r, "did you mean \"max_steps\"");
  expect_contains(r, "typo.json");
  EXPECT_EQ(sdtrain_run("--config " + (dir / "missing.json").string()).code, 1);
  auto fp16 = copy_demo(dir);
  r = sdtrain_run("--config " + fp16.string() + " --dry-run --set mixed_precision=fp16");
  EXPECT_EQ(r.code, 1);
  expect_contains(r, "needs a CUDA GPU");
}

TEST(Cli, InputDataErrorsExitWithCode2AndNameTheFile) {
  auto dir = sdtrain::testing::scratch_dir();
  auto config = copy_demo(dir);
  auto instance = dir / "demo" / "instance";
  std::ofstream(instance / "corrupt.jpg") << "not a jpeg";
  auto r = sdtrain_run("--config " + config.string() + " --dry-run");
  EXPECT_EQ(r.code, 2);
  expect_contains(r, "corrupt.jpg");
  fs::remove(instance / "corrupt.jpg");

  fs::create_symlink("loop.png", instance / "loop.png");  // a symbolic link to itself
  r = sdtrain_run("--config " + config.string() + " --dry-run");
  EXPECT_EQ(r.code, 2) << r.output;
  expect_contains(r, "loop.png");
  fs::remove(instance / "loop.png");

  fs::remove(instance / "dataset_info.json");
  r = sdtrain_run("--config " + config.string() + " --dry-run");
  EXPECT_EQ(r.code, 2);
  expect_contains(r, "dataset_info.json: file not found");

  std::ofstream(instance / "dataset_info.json") << R"({"instance_prompt": "a photo of sks robot"})";
  r = sdtrain_run("--config " + config.string() + " --dry-run");
  EXPECT_EQ(r.code, 2);
  expect_contains(r, "class_prompt");

  for (const auto& entry : fs::directory_iterator(instance)) {
    if (entry.path().extension() != ".json") fs::remove(entry.path());
  }
  r = sdtrain_run("--config " + config.string() + " --dry-run --set class_prompt=robot");
  EXPECT_EQ(r.code, 2);
  expect_contains(r, "no images");
}

TEST(Cli, ModelErrorsExitWithCode3) {
  auto dir = sdtrain::testing::scratch_dir();
  auto config = copy_demo(dir);
  auto model = dir / "demo" / "model";
  fs::remove(model / "vae" / "diffusion_pytorch_model.safetensors");
  auto r = sdtrain_run("--config " + config.string() + " --dry-run");
  EXPECT_EQ(r.code, 3);
  expect_contains(r, "no safetensors weights");

  std::ofstream(model / "vae" / "diffusion_pytorch_model.safetensors") << "garbage!";
  r = sdtrain_run("--config " + config.string() + " --dry-run");
  EXPECT_EQ(r.code, 3);
  expect_contains(r, "vae/diffusion_pytorch_model.safetensors: invalid safetensors file");

  r = sdtrain_run("--config " + config.string() + " --dry-run --set pretrained_model_name_or_path=/nonexistent/sd21");
  EXPECT_EQ(r.code, 3);
  expect_contains(r, "model folder not found");

  r = sdtrain_run("inspect " + (model / "vae" / "diffusion_pytorch_model.safetensors").string());
  EXPECT_EQ(r.code, 3);
}

// The reference environment (diffusers, which wrote configs/demo/model) must agree with
// `sdtrain inspect --json` on every component's tensor count and parameter total.
TEST(Cli, InspectMatchesTheReferenceEnvironment) {
  std::string python = sdtrain::testing::reference_python();
  if (python.empty()) GTEST_SKIP() << "reference Python environment not configured (scripts/setup.sh makes it)";
  auto model = demo() / "model";
  auto ours = sdtrain_run("inspect --json " + model.string());
  ASSERT_EQ(ours.code, 0) << ours.output;
  auto inspection = nlohmann::json::parse(ours.output.substr(ours.output.find('{')));

  std::string script = sdtrain::testing::source_dir().string() + "/tests/cli/count_parameters.py";
  std::string reference_output;
  ASSERT_EQ(run_command(python + " " + script + " " + model.string(), &reference_output), 0) << reference_output;
  auto reference = nlohmann::json::parse(reference_output.substr(reference_output.find('{')));

  int compared = 0;
  for (const auto& component : inspection["components"]) {
    std::string name = component["name"];
    if (!reference.contains(name)) continue;
    EXPECT_EQ(component["tensors"], reference[name]["tensors"]) << name;
    EXPECT_EQ(component["parameters"], reference[name]["parameters"]) << name;
    ++compared;
  }
  EXPECT_EQ(compared, 3);  // unet, vae, text_encoder
}
