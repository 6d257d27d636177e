// compute.channels_last in a training run (models::to_channels_last, docs/performance.md): the
// option reaches the UNet and the VAE, the demo trains to the NCHW run's losses, a resume is exact
// (the optimizer's states follow the NHWC storage order and loads keep that layout), and a resume
// with the other layout, or channels-last from a checkpoint older than the setting, is refused.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <regex>

#include "sdtrain/train/checkpoint.h"
#include "sdtrain/util/error.h"
#include "train_support.h"

namespace fs = std::filesystem;
using namespace sdtrain::testing;

// fp32 on the CPU with AdamW (its states are indexed as the weights, so only the convolutions'
// order of additions differs between the layouts): the losses differed by 1.2e-7 relative at
// most on the build machine; 1e-5 leaves two orders of room.
TEST(ChannelsLastTraining, TheDemoGivesTheNchwLossesOnTheCpu) {
  const fs::path scratch = scratch_dir();
  std::vector<double> losses[2];
  for (const bool channels_last : {true, false}) {
    const fs::path dir = scratch / (channels_last ? "nhwc" : "nchw");
    fs::create_directories(dir);
    const auto result = run_sdtrain(
        "--config " +
        write_config(dir, {{"max_steps", 5}, {"optimizer", "adamw"}, {"channels_last", channels_last}})
            .string());
    ASSERT_EQ(result.code, 0) << result.output;
    // Both models: the UNet, and the frozen VAE that encodes the images every step.
    EXPECT_EQ(std::regex_search(result.output,
                                std::regex("channels_last: [1-9][0-9]* UNet and [1-9][0-9]* VAE "
                                           "convolution weights stored NHWC")),
              channels_last)
        << result.output;
    losses[channels_last ? 0 : 1] = logged_losses(dir / "out");
  }
  ASSERT_EQ(losses[0].size(), 5u);
  ASSERT_EQ(losses[1].size(), 5u);
  for (size_t i = 0; i < 5; ++i)
    EXPECT_NEAR(losses[0][i], losses[1][i], 1e-5 * std::abs(losses[1][i])) << "step " << i + 1;
}

TEST(ChannelsLastTraining, AResumeWithTheOtherLayoutIsRefused) {
  const fs::path dir = scratch_dir();
  const nlohmann::json first = {{"max_steps", 3}, {"checkpointing_steps", 2},
                                {"optimizer", "adamw8bit"}, {"channels_last", true}};
  const auto written = run_sdtrain("--config " + write_config(dir, first).string());
  ASSERT_EQ(written.code, 0) << written.output;
  nlohmann::json second = first;
  second["max_steps"] = 4;
  second["channels_last"] = false;
  second["resume_from_checkpoint"] = "latest";
  const auto resumed = run_sdtrain("--config " + write_config(dir, second).string());
  EXPECT_EQ(resumed.code, 1) << resumed.output;
  EXPECT_NE(resumed.output.find("channels_last: checkpoint true, now false"), std::string::npos)
      << resumed.output;
}

// A checkpoint written before the setting existed was NCHW: it resumes with channels_last false
// (a setting a checkpoint does not record reads as its default) and is refused with true.
TEST(ChannelsLastTraining, ACheckpointWithoutTheSettingWasNchw) {
  sdtrain::train::TrainerState saved;
  saved.config = {{"learning_rate", 1e-4}};
  const nlohmann::ordered_json nchw = {{"learning_rate", 1e-4}, {"channels_last", false}};
  const nlohmann::ordered_json nhwc = {{"learning_rate", 1e-4}, {"channels_last", true}};
  EXPECT_NO_THROW(sdtrain::train::check_resumable_settings(saved, nchw, "checkpoint-2"));
  try {
    sdtrain::train::check_resumable_settings(saved, nhwc, "checkpoint-2");
    FAIL() << "resumed channels-last from an NCHW checkpoint";
  } catch (const sdtrain::ConfigError& error) {
    EXPECT_NE(std::string(error.what())
                  .find("channels_last: checkpoint false (not recorded: the default), now true"),
              std::string::npos)
        << error.what();
  }
}
