// SDTRAIN_PROFILE (include/sdtrain/train/step_profiler.h): the named steps run under the
// profiler and their Chrome trace is written; a malformed value stops before any model loads,
// exit 1, naming the variable and the fix.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;

namespace {

using sdtrain::testing::run_command;

TEST(StepProfiler, WritesATraceOfTheRequestedSteps) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = sdtrain::testing::write_config(dir, {{"max_steps", 4}});
  const fs::path trace = dir / "trace.json";
  std::string output;
  const int code = run_command("SDTRAIN_PROFILE=1:2:" + trace.string() + " " +
                                   sdtrain::testing::sdtrain_exe() + " --config " + config.string(),
                               &output);
  ASSERT_EQ(code, 0) << output;
  EXPECT_NE(output.find("profile: steps 2 to 3 took"), std::string::npos) << output;
  ASSERT_TRUE(fs::exists(trace));
  const nlohmann::json parsed = nlohmann::json::parse(std::ifstream(trace));
  int operators = 0;
  for (const auto& event : parsed.at("traceEvents")) {
    if (event.value("cat", "") == "cpu_op") ++operators;
  }
  EXPECT_GT(operators, 100);  // a UNet forward and backward alone run hundreds of operators
}

TEST(StepProfiler, AMalformedValueStopsBeforeTraining) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path config = sdtrain::testing::write_config(dir, {{"max_steps", 2}});
  std::string output;
  const int code = run_command(
      "SDTRAIN_PROFILE=20 " + sdtrain::testing::sdtrain_exe() + " --config " + config.string(),
      &output);
  EXPECT_EQ(code, 1) << output;
  EXPECT_NE(output.find("SDTRAIN_PROFILE=20: expected FIRST:COUNT:TRACE.json"), std::string::npos)
      << output;
  EXPECT_FALSE(fs::exists(dir / "out" / "unet"));
}

}  // namespace
