// Learning-rate schedules against diffusers' get_scheduler (tests/fixtures/train/lr_schedules.json,
// written by tools/make_lr_ema_fixtures.py): the rate of every optimizer step of a 50-step run,
// and 5 steps past its end.
//
// Tolerance: relative 1e-12. The code keeps diffusers' operation order in double precision, so
// the values are expected to be equal (and are, on glibc); the margin only allows a libm whose
// cos/pow differ from CPython's in the last bits.

#include "sdtrain/train/lr_schedule.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <iostream>
#include <nlohmann/json.hpp>

#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::train;

namespace {

constexpr double kRelativeTolerance = 1e-12;

nlohmann::json read_fixture() {
  auto path = sdtrain::testing::fixture("train/lr_schedules.json");
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << path << " is missing; regenerate it with\n"
                         << "  ~/.cache/sdtrain/venv/bin/python tools/make_lr_ema_fixtures.py";
  return nlohmann::json::parse(in);
}

LrScheduleOptions options_of(const nlohmann::json& c) {
  LrScheduleOptions o;
  o.name = c.at("name");
  o.learning_rate = c.at("learning_rate");
  o.warmup_steps = c.at("warmup");
  o.total_steps = c.at("total_steps");
  o.num_cycles = c.value("num_cycles", 1);
  o.power = c.value("power", 1.0);
  return o;
}

std::string describe(const nlohmann::json& c) { return c.dump(-1).substr(0, 120); }

TrainConfig demo_config(const std::vector<std::string>& overrides) {
  return load_train_config(sdtrain::testing::source_dir() / "configs" / "demo.json", overrides);
}

}  // namespace

TEST(LrSchedule, EverySchedulePerStepMatchesDiffusers) {
  auto fixture = read_fixture();
  ASSERT_GE(fixture.at("cases").size(), lr_schedule_names().size());
  for (const auto& c : fixture.at("cases")) {
    LrScheduleOptions options = options_of(c);
    const auto& rates = c.at("rates");
    int64_t exact = 0;
    double worst = 0;
    for (int64_t step = 0; step < static_cast<int64_t>(rates.size()); ++step) {
      double expected = rates[step], actual = learning_rate_at(options, step);
      double scale = std::max(std::abs(expected), 1e-300);
      worst = std::max(worst, std::abs(actual - expected) / scale);
      exact += actual == expected;
      EXPECT_LE(std::abs(actual - expected), kRelativeTolerance * scale)
          << describe(c) << " step " << step << ": " << actual << " vs diffusers " << expected;
    }
    std::cout << "[ measured ] " << options.name << " warmup " << options.warmup_steps << ": "
              << exact << "/" << rates.size() << " bit-equal, max relative difference " << worst
              << "\n";
  }
}

TEST(LrSchedule, FixtureCoversEveryScheduleName) {
  auto fixture = read_fixture();
  for (const auto& name : lr_schedule_names()) {
    bool found = false;
    for (const auto& c : fixture.at("cases")) found = found || c.at("name") == name;
    EXPECT_TRUE(found) << name;
  }
}

TEST(LrSchedule, NamesAreThoseTrainConfigAccepts) {
  for (const auto& name : lr_schedule_names()) {
    auto config = demo_config({"lr_scheduler=" + name});
    EXPECT_NO_THROW(learning_rate_at(lr_schedule_options(config, 100), 0)) << name;
  }
  // diffusers' get_scheduler also knows piecewise_constant; train_dreambooth.py does not offer it.
  EXPECT_THROW(demo_config({"lr_scheduler=piecewise_constant"}), ConfigError);
  LrScheduleOptions unknown;
  unknown.name = "piecewise_constant";
  unknown.learning_rate = 1e-4;
  try {
    learning_rate_at(unknown, 0);
    ADD_FAILURE() << "accepted an unknown schedule";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    EXPECT_NE(std::string(e.what()).find("\"piecewise_constant\""), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("cosine_with_restarts"), std::string::npos) << e.what();
  }
}

TEST(LrSchedule, PolynomialNeedsARateAboveLrEndAsDiffusers) {
  LrScheduleOptions options;
  options.name = "polynomial";
  options.total_steps = 10;
  options.learning_rate = 1e-7;
  EXPECT_THROW(learning_rate_at(options, 0), ConfigError);
  options.learning_rate = 2e-7;
  EXPECT_DOUBLE_EQ(learning_rate_at(options, 10), 1e-7);
  EXPECT_DOUBLE_EQ(learning_rate_at(options, 11), 1e-7);
  // Warm-up filling the whole run: diffusers divides by zero at the last step; we give lr_end.
  options.warmup_steps = 10;
  EXPECT_DOUBLE_EQ(learning_rate_at(options, 9), 2e-7 * 0.9);
  EXPECT_DOUBLE_EQ(learning_rate_at(options, 10), 1e-7);
}

TEST(LrSchedule, OptionsComeFromTheConfiguration) {
  auto config = demo_config({"lr_scheduler=cosine_with_restarts", "lr_warmup_steps=7",
                             "lr_num_cycles=3", "lr_power=2", "learning_rate=1e-5",
                             "train_batch_size=2", "gradient_accumulation_steps=3"});
  auto options = lr_schedule_options(config, 120);
  EXPECT_EQ(options.name, "cosine_with_restarts");
  EXPECT_EQ(options.warmup_steps, 7);
  EXPECT_EQ(options.total_steps, 120);
  EXPECT_EQ(options.num_cycles, 3);
  EXPECT_EQ(options.power, 2.0);
  EXPECT_EQ(options.learning_rate, 1e-5);
  // --scale_lr multiplies by batch size x accumulation steps (x processes, here 1).
  config.optimizer.scale_lr = true;
  EXPECT_DOUBLE_EQ(lr_schedule_options(config, 120).learning_rate, 6e-5);
}
