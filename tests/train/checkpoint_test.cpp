// Checkpoint folders: written whole or not at all, listed and pruned by step, resolved from
// "latest" / a name / a path, with the trainer state and generator state restored exactly.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/train/checkpoint.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace sdtrain::train {
namespace {

TrainerState sample_state(int64_t step) {
  TrainerState state;
  state.global_step = step;
  state.epoch = 3;
  state.batch_in_epoch = 2;
  state.loss_scale = 0.1 + 65536.0 / 3.0;  // needs all 17 digits to round-trip
  state.loss_scale_growth_tracker = 41;
  state.last_loss = 0.123456789012345;
  at::Generator generator = at::make_generator<at::CPUGeneratorImpl>(1234);
  (void)at::randn({7}, generator);
  state.rng_state = generator.get_state();
  state.config = {{"learning_rate", 2e-6}, {"seed", 1234}};
  return state;
}

void write_marker(const fs::path& dir) { std::ofstream(dir / "marker.txt") << "models"; }

TEST(Checkpoint, SavesAndRestoresTheTrainerStateExactly) {
  const fs::path out = testing::scratch_dir();
  const TrainerState state = sample_state(20);
  const fs::path dir = write_checkpoint_folder(out, state, write_marker);
  EXPECT_EQ(dir, out / "checkpoint-20");
  EXPECT_TRUE(fs::exists(dir / "marker.txt"));
  const TrainerState read = read_trainer_state(dir);
  EXPECT_EQ(read.global_step, 20);
  EXPECT_EQ(read.epoch, 3);
  EXPECT_EQ(read.batch_in_epoch, 2);
  EXPECT_EQ(read.loss_scale, state.loss_scale);
  EXPECT_EQ(read.loss_scale_growth_tracker, 41);
  EXPECT_EQ(read.last_loss, state.last_loss);
  EXPECT_EQ(read.config, state.config);
  // The restored generator continues with the same numbers.
  at::Generator a = at::make_generator<at::CPUGeneratorImpl>(0);
  at::Generator b = at::make_generator<at::CPUGeneratorImpl>(0);
  a.set_state(state.rng_state);
  b.set_state(read.rng_state);
  EXPECT_TRUE(torch::equal(at::randn({16}, a), at::randn({16}, b)));
}

TEST(Checkpoint, AFailedSaveLeavesNoCheckpointAndKeepsThePreviousOne) {
  const fs::path out = testing::scratch_dir();
  write_checkpoint_folder(out, sample_state(10), write_marker);
  EXPECT_THROW(write_checkpoint_folder(out, sample_state(20),
                               [](const fs::path&) { throw OutputError("No space left on device"); }),
               OutputError);
  EXPECT_FALSE(fs::exists(out / "checkpoint-20"));
  for (const auto& entry : fs::directory_iterator(out)) {
    EXPECT_FALSE(entry.path().filename().string().starts_with(".checkpoint-20.partial")) << entry.path();
  }
  ASSERT_EQ(list_checkpoints(out).size(), 1u);
  EXPECT_EQ(read_trainer_state(out / "checkpoint-10").global_step, 10);
}

TEST(Checkpoint, ListsByStepIgnoresPartialFoldersAndPrunesTheOldest) {
  const fs::path out = testing::scratch_dir();
  for (int64_t step : {100, 20, 300}) write_checkpoint_folder(out, sample_state(step), write_marker);
  fs::create_directories(out / ".checkpoint-400.partial");
  fs::create_directories(out / "checkpoint-500");  // no trainer_state.json: an interrupted copy
  auto listed = list_checkpoints(out);
  ASSERT_EQ(listed.size(), 3u);
  EXPECT_EQ(listed[0].filename(), "checkpoint-20");
  EXPECT_EQ(listed[2].filename(), "checkpoint-300");
  prune_checkpoints(out, 2);
  listed = list_checkpoints(out);
  ASSERT_EQ(listed.size(), 2u);
  EXPECT_EQ(listed[0].filename(), "checkpoint-100");
}

TEST(Checkpoint, ResolvesLatestNamesAndPaths) {
  const fs::path out = testing::scratch_dir();
  EXPECT_FALSE(resolve_checkpoint(out, "latest").has_value());
  write_checkpoint_folder(out, sample_state(5), write_marker);
  write_checkpoint_folder(out, sample_state(15), write_marker);
  EXPECT_EQ(resolve_checkpoint(out, "latest").value(), out / "checkpoint-15");
  EXPECT_EQ(resolve_checkpoint(out, "checkpoint-5").value(), out / "checkpoint-5");
  EXPECT_EQ(resolve_checkpoint(out, (out / "checkpoint-5").string()).value(), out / "checkpoint-5");
  try {
    resolve_checkpoint(out, "checkpoint-7");
    FAIL() << "expected a ConfigError";
  } catch (const ConfigError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("checkpoint-7"), std::string::npos) << message;
    EXPECT_NE(message.find("checkpoint-15"), std::string::npos) << message;  // lists what exists
  }
}

// Replaces `key` of checkpoint_dir/trainer_state.json with `value` (a JSON text).
void edit_state(const fs::path& checkpoint_dir, const std::string& key, const std::string& value) {
  const fs::path path = checkpoint_dir / "trainer_state.json";
  nlohmann::json json = nlohmann::json::parse(std::ifstream(path));
  json[key] = nlohmann::json::parse(value);
  std::ofstream(path) << json.dump(2);
}

TEST(Checkpoint, OutOfRangeOrDamagedTrainerStateFieldsAreRefusedNamingTheFile) {
  const std::vector<std::pair<std::string, std::string>> edits = {
      {"global_step", "-5"},       {"global_step", "1000"},   {"global_step", "\"12\""},
      {"epoch", "-1"},             {"batch_in_epoch", "-3"},   {"batch_in_epoch", "2.5"},
      {"loss_scale", "0"},         {"loss_scale", "-1"},       {"loss_scale_growth_tracker", "-2"},
      {"config", "[1, 2]"},        {"config", "null"},         {"dataset", "{\"instance_images\": 0}"}};
  for (const auto& [key, value] : edits) {
    const fs::path out = testing::scratch_dir();
    const fs::path dir = write_checkpoint_folder(out, sample_state(12), write_marker);
    edit_state(dir, key, value);
    try {
      read_trainer_state(dir);
      ADD_FAILURE() << key << " = " << value << " was accepted";
    } catch (const ModelError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find((dir / "trainer_state.json").string()), std::string::npos) << message;
      const std::string needle = key == "dataset" ? "instance_images" : key;  // the field inside it
      EXPECT_NE(message.find(needle), std::string::npos) << key << ": " << message;
    }
  }
}

TEST(Checkpoint, LatestIsTheNewestWholeCheckpointAndANamedDamagedOneIsRefused) {
  const fs::path out = testing::scratch_dir();
  write_checkpoint_folder(out, sample_state(5), write_marker);
  write_checkpoint_folder(out, sample_state(15), write_marker);
  std::ofstream(out / "checkpoint-15" / "marker.txt") << "modelz";  // same size, one byte differs
  EXPECT_EQ(resolve_checkpoint(out, "latest").value(), out / "checkpoint-5");
  try {
    resolve_checkpoint(out, "checkpoint-15");
    FAIL() << "a damaged checkpoint was accepted";
  } catch (const ModelError& error) {
    EXPECT_NE(std::string(error.what()).find((out / "checkpoint-15" / "marker.txt").string()), std::string::npos)
        << error.what();
  }
  fs::remove(out / "checkpoint-5" / "manifest.json");  // as a save killed before its manifest
  EXPECT_THROW(resolve_checkpoint(out, "latest"), ModelError);
}

}  // namespace
}  // namespace sdtrain::train
