// Run safety through the executable (docs/training.md, "What a run guarantees"):
//  * one run per output_dir: a second one is refused at once, naming the first, which goes on;
//  * the base model, photos and class images are never written;
//  * a resume after photos were removed refuses clearly or continues from the next epoch,
//    and never spins;
//  * a damaged checkpoint is never trusted: "latest" passes over it to the last whole one;
//  * killed (SIGKILL) anywhere, the same command finishes the run with the same bytes as an
//    uninterrupted run, every metrics.jsonl line parses, each step is logged once, and the
//    output folder never holds components of two different exports.
#include <gtest/gtest.h>

#include <map>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/file_manifest.h"
#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;
using namespace sdtrain::testing;

namespace {

CommandResult sdtrain(const std::string& args) {
  // `timeout`: a run that hangs fails the test (exit 124) instead of stalling the suite.
  CommandResult result;
  result.code = run_command("timeout 300 " + sdtrain_exe() + " " + args, &result.output);
  return result;
}

std::string log_of(const fs::path& dir) { return sdtrain::read_file(dir / "log.txt"); }

// Every file under `dir` with its bytes, to prove a folder was not touched.
std::map<std::string, std::string> snapshot(const fs::path& dir) {
  std::map<std::string, std::string> files;
  for (const auto& entry : fs::recursive_directory_iterator(dir)) {
    if (entry.is_regular_file()) files[fs::relative(entry.path(), dir).string()] = sdtrain::read_file(entry.path());
  }
  return files;
}

std::vector<nlohmann::json> metrics_records(const fs::path& out) {
  std::vector<nlohmann::json> records;
  std::ifstream in(out / "logs" / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) {
    EXPECT_TRUE(nlohmann::json::accept(line)) << "not a JSON line: " << line;
    if (nlohmann::json::accept(line)) records.push_back(nlohmann::json::parse(line));
  }
  return records;
}

TEST(RunSafety, ASecondRunIntoTheSameOutputDirIsRefusedAndTheFirstGoesOn) {
  const fs::path dir = scratch_dir();
  const fs::path config = write_config(dir, {{"max_steps", 100000}});
  const fs::path metrics = dir / "out" / "logs" / "metrics.jsonl";
  const pid_t first = start_sdtrain(dir, config);
  ASSERT_TRUE(wait_until([&] { return fs::exists(metrics) && fs::file_size(metrics) > 0; })) << log_of(dir);

  fs::create_directories(dir / "second");
  const fs::path other = write_config(dir / "second", {{"output_dir", (dir / "out").string()},
                                                       {"learning_rate", 1e-3}, {"max_steps", 2}});
  for (const std::string extra : {"", " --overwrite"}) {
    const CommandResult second = sdtrain("--config " + other.string() + extra);
    EXPECT_EQ(second.code, 1) << second.output;
    EXPECT_NE(second.output.find("in use by another sdtrain run (pid " + std::to_string(first)), std::string::npos)
        << second.output;
  }
  const nlohmann::json written = nlohmann::json::parse(std::ifstream(dir / "out" / "train_config.json"));
  EXPECT_EQ(written["learning_rate"].get<double>(), 1e-4) << "the refused run rewrote train_config.json";

  const int status = stop_sdtrain(first, SIGTERM);
  ASSERT_TRUE(WIFEXITED(status)) << log_of(dir);
  EXPECT_EQ(WEXITSTATUS(status), 143) << log_of(dir);
  // The kernel released the lock with the process: the next run may go on.
  const CommandResult resumed = sdtrain("--config " + config.string() + " --set max_steps=1 --set resume_from_checkpoint=latest");
  EXPECT_EQ(resumed.code, 0) << resumed.output;
}

TEST(RunSafety, NeverWritesIntoTheBaseModelOrThePhotos) {
  const fs::path dir = scratch_dir();
  const fs::path model = dir / "model";
  const fs::path photos = dir / "photos";
  fs::copy(demo() / "model", model, fs::copy_options::recursive);
  fs::copy(demo() / "instance", photos, fs::copy_options::recursive);
  const auto model_before = snapshot(model);
  const auto photos_before = snapshot(photos);
  const nlohmann::json inputs = {{"pretrained_model_name_or_path", model.string()},
                                 {"instance_data_dir", photos.string()}, {"max_steps", 1}};
  for (const fs::path& output : {model, model / "unet", photos, photos / "out"}) {
    nlohmann::json overrides = inputs;
    overrides["output_dir"] = output.string();
    const fs::path config = write_config(dir, overrides);
    for (const std::string extra : {"", " --overwrite", " --set resume_from_checkpoint=latest", " --dry-run"}) {
      const CommandResult run = sdtrain("--config " + config.string() + extra);
      EXPECT_EQ(run.code, 1) << output << extra << "\n" << run.output;
      EXPECT_NE(run.output.find("would write into"), std::string::npos) << run.output;
    }
  }
  EXPECT_EQ(snapshot(model), model_before);
  EXPECT_EQ(snapshot(photos), photos_before);
}

TEST(RunSafety, ResumeAfterPhotosWereRemovedRefusesClearlyOrStartsTheNextEpoch) {
  const fs::path dir = scratch_dir();
  const fs::path photos = dir / "photos";
  fs::copy(demo() / "instance", photos, fs::copy_options::recursive);
  const fs::path config = write_config(dir, {{"instance_data_dir", photos.string()}, {"max_steps", 4},
                                             {"checkpointing_steps", 3}, {"resume_from_checkpoint", "latest"}});
  ASSERT_EQ(sdtrain("--config " + config.string()).code, 0);
  fs::remove(photos / "robot2.png");
  fs::remove(photos / "robot3.jpg");

  // checkpoint-3 stopped after micro-batch 3 of a 4-photo epoch; the epoch now has 2.
  const CommandResult refused = sdtrain("--config " + config.string() + " --set max_steps=6");
  EXPECT_EQ(refused.code, 2) << refused.output;
  EXPECT_NE(refused.output.find("4 photos and 0 class images then, 2 and 0 now"), std::string::npos) << refused.output;
  EXPECT_NE(refused.output.find("resume_reset_epoch"), std::string::npos) << refused.output;

  const CommandResult reset = sdtrain("--config " + config.string() + " --set max_steps=6 --set resume_reset_epoch=true");
  ASSERT_EQ(reset.code, 0) << reset.output;
  EXPECT_NE(reset.output.find("trained 6 steps (3 in this run)"), std::string::npos) << reset.output;
}

TEST(RunSafety, ADamagedCheckpointIsNeverTrustedAndLatestUsesTheLastWholeOne) {
  const fs::path dir = scratch_dir();
  const fs::path config = write_config(dir, {{"max_steps", 6}, {"checkpointing_steps", 2}});
  ASSERT_EQ(sdtrain("--config " + config.string()).code, 0);
  const fs::path damaged = dir / "out" / "checkpoint-4" / "optimizer.safetensors";
  std::string bytes = sdtrain::read_file(damaged);
  bytes[bytes.size() - 100] = static_cast<char>(0xFF);
  std::ofstream(damaged, std::ios::binary) << bytes;

  const CommandResult named = sdtrain("--config " + config.string() + " --set resume_from_checkpoint=checkpoint-4");
  EXPECT_EQ(named.code, 3) << named.output;
  EXPECT_NE(named.output.find(damaged.string()), std::string::npos) << named.output;

  const CommandResult latest = sdtrain("--config " + config.string() + " --set resume_from_checkpoint=latest");
  ASSERT_EQ(latest.code, 0) << latest.output;
  EXPECT_NE(latest.output.find("not resuming from " + (dir / "out" / "checkpoint-4").string()), std::string::npos)
      << latest.output;
  EXPECT_NE(latest.output.find("resuming from " + (dir / "out" / "checkpoint-2").string()), std::string::npos)
      << latest.output;
  // Retraining step 4 wrote checkpoint-4 afresh, whole again.
  EXPECT_EQ(sdtrain::verify_manifest(dir / "out" / "checkpoint-4"), std::nullopt);
}

TEST(RunSafety, KilledAnywhereTheSameCommandFinishesWithTheSameBytes) {
  const nlohmann::json settings = {{"max_steps", 6}, {"checkpointing_steps", 2}, {"resume_from_checkpoint", "latest"},
                                   {"with_prior_preservation", true}, {"num_class_images", 4}};
  const fs::path straight = scratch_dir() / "straight";
  fs::create_directories(straight);
  ASSERT_EQ(sdtrain("--config " + write_config(straight, settings).string()).code, 0);
  const std::string expected = sdtrain::read_file(straight / "out" / "unet" / "diffusion_pytorch_model.safetensors");

  for (const std::string point : {"step#1", "step#3", "checkpoint-files#2", "checkpoint-published#1", "metrics-line#1",
                                  "metrics-line#4", "export-component#1", "export-before-index#1"}) {
    SCOPED_TRACE(point);
    const fs::path dir = scratch_dir() / ("killed-" + point.substr(0, point.find('#')) + point.substr(point.find('#') + 1));
    fs::create_directories(dir);
    const fs::path config = write_config(dir, settings);
    int status = 0;
    ::waitpid(start_sdtrain(dir, config, {"SDTRAIN_KILL_AT=" + point}), &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << log_of(dir);
    // A reader never finds a model_index.json beside a half-replaced set of components.
    EXPECT_FALSE(fs::exists(dir / "out" / "model_index.json"));

    const CommandResult again = sdtrain("--config " + config.string());
    ASSERT_EQ(again.code, 0) << again.output;
    EXPECT_EQ(sdtrain::read_file(dir / "out" / "unet" / "diffusion_pytorch_model.safetensors"), expected);
    std::vector<int64_t> steps;
    for (const auto& record : metrics_records(dir / "out")) steps.push_back(record["step"].get<int64_t>());
    EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3, 4, 5, 6}));
    for (const auto& entry : fs::recursive_directory_iterator(dir / "out")) {
      const std::string name = entry.path().filename().string();
      EXPECT_TRUE(name.find(".partial") == std::string::npos && name.find(".tmp.") == std::string::npos) << entry.path();
    }
  }
}

TEST(RunSafety, AMetricsFileThatCannotBeWrittenStopsTheRunWithExitCode5) {
  const fs::path dir = scratch_dir();
  const fs::path config = write_config(dir, {{"max_steps", 3}});
  fs::create_directories(dir / "out" / "logs");
  fs::create_symlink("/dev/full", dir / "out" / "logs" / "metrics.jsonl");  // every write: ENOSPC
  const CommandResult run = sdtrain("--config " + config.string());
  EXPECT_EQ(run.code, 5) << run.output;
  EXPECT_NE(run.output.find("metrics.jsonl"), std::string::npos) << run.output;
}

}  // namespace
