// compute.attention_backend in a training run (models/attention_backend.h,
// docs/performance.md): the choice reaches every attention of the run, the log names the
// kernel each kind of attention ran on, the demo trains to the same losses as with torch's own
// choice, a resume may change it, and an unknown name is refused with the choices.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "train_support.h"

namespace fs = std::filesystem;
using namespace sdtrain::testing;

namespace {

std::string attention_line(const std::string& output) {
  const size_t start = output.find("attention kernels: ");
  if (start == std::string::npos) return "";
  return output.substr(start, output.find('\n', start) - start);
}

}  // namespace

// fp32 on the CPU: the math kernel and the CPU's flash kernel compute the same attention in
// another order of additions (tests/models/attention_backend_test.cpp bounds one call at 1e-5
// absolute); through five steps of the demo the losses stay within 1e-5 relative.
TEST(AttentionBackendTraining, MathGivesTheLossesOfTorchsChoiceAndTheLogSaysWhatRan) {
  const fs::path scratch = scratch_dir();
  std::vector<double> losses[2];
  for (const std::string backend : {"math", "auto"}) {
    const fs::path dir = scratch / backend;
    fs::create_directories(dir);
    const auto result =
        run_sdtrain("--config " + write_config(dir, {{"max_steps", 5},
                                                     {"optimizer", "adamw"},
                                                     {"attention_backend", backend}})
                                      .string());
    ASSERT_EQ(result.code, 0) << result.output;
    const std::string line = attention_line(result.output);
    const std::string kernel = backend == "math" ? "math" : "flash";
    // The UNet trained (with gradients), the frozen text encoder (causal) and the VAE.
    EXPECT_NE(line.find(kernel + " for "), std::string::npos) << result.output;
    EXPECT_NE(line.find("with gradients"), std::string::npos) << line;
    EXPECT_NE(line.find("causal"), std::string::npos) << line;
    EXPECT_EQ(line.find(backend == "math" ? "flash" : "math"), std::string::npos) << line;
    losses[backend == "math" ? 0 : 1] = logged_losses(dir / "out");
  }
  ASSERT_EQ(losses[0].size(), 5u);
  ASSERT_EQ(losses[1].size(), 5u);
  for (size_t i = 0; i < 5; ++i)
    EXPECT_NEAR(losses[0][i], losses[1][i], 1e-5 * std::abs(losses[1][i])) << "step " << i + 1;
}

// Only which kernel computes attention differs, not what is trained: a checkpoint of one choice
// resumes with another, and the resumed process reports its own kernels.
TEST(AttentionBackendTraining, AResumeMayChooseAnotherKernel) {
  const fs::path dir = scratch_dir();
  const nlohmann::json first = {
      {"max_steps", 3}, {"checkpointing_steps", 2}, {"attention_backend", "math"}};
  const auto written = run_sdtrain("--config " + write_config(dir, first).string());
  ASSERT_EQ(written.code, 0) << written.output;
  nlohmann::json second = first;
  second["max_steps"] = 4;
  second["attention_backend"] = "flash";
  second["resume_from_checkpoint"] = "latest";
  const auto resumed = run_sdtrain("--config " + write_config(dir, second).string());
  ASSERT_EQ(resumed.code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("resuming from"), std::string::npos) << resumed.output;
  EXPECT_NE(attention_line(resumed.output).find("flash for"), std::string::npos) << resumed.output;
  EXPECT_EQ(attention_line(resumed.output).find("math"), std::string::npos) << resumed.output;
  EXPECT_EQ(logged_losses(dir / "out").size(), 4u);
}

TEST(AttentionBackendTraining, AnUnknownKernelIsRefusedWithTheChoices) {
  const fs::path dir = scratch_dir();
  const auto result = run_sdtrain(
      "--config " +
      write_config(dir, {{"max_steps", 1}, {"attention_backend", "xformers"}}).string());
  EXPECT_EQ(result.code, 1) << result.output;
  EXPECT_NE(result.output.find("attention_backend"), std::string::npos) << result.output;
  EXPECT_NE(result.output.find("efficient"), std::string::npos) << result.output;
}
