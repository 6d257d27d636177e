// cuda_graphs (include/sdtrain/train/micro_batch_pass.h, docs/performance.md). On the CPU: what
// stands in the way of a capture is named, `true` refuses it before anything is loaded, `auto`
// says nothing where there is no GPU. On a GPU (skipped without one): the demo trained with its
// passes replayed from a graph logs the capture and gives the eager run's losses.
#include "sdtrain/train/micro_batch_pass.h"

#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/train/plan.h"
#include "sdtrain/util/error.h"
#include "train_support.h"

namespace fs = std::filesystem;
using namespace sdtrain;
using namespace sdtrain::train;

namespace {

TrainConfig demo_config(const std::vector<std::string>& overrides) {
  return load_train_config(sdtrain::testing::source_dir() / "configs" / "demo.json", overrides);
}

std::vector<double> losses(const fs::path& output_dir) {
  std::vector<double> values;
  std::ifstream metrics(output_dir / "logs" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);)
    values.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return values;
}

}  // namespace

TEST(CudaGraphs, EachObstacleIsNamed) {
  EXPECT_FALSE(cuda_graph_obstacle(true, false, false, 1).has_value());
  EXPECT_NE(cuda_graph_obstacle(false, false, false, 1)->find("CPU"), std::string::npos);
  EXPECT_NE(cuda_graph_obstacle(true, true, false, 1)->find("data parallel"), std::string::npos);
  EXPECT_NE(cuda_graph_obstacle(true, false, true, 1)->find("fused_backward_pass"),
            std::string::npos);
  EXPECT_NE(cuda_graph_obstacle(true, false, false, 2)->find("gradient_accumulation_steps"),
            std::string::npos);
}

TEST(CudaGraphs, TrueOnTheCpuIsRefusedAsAConfigError) {
  try {
    plan_training(demo_config({"device=cpu", "cuda_graphs=true"}));
    FAIL() << "no error";
  } catch (const ConfigError& error) {
    EXPECT_NE(std::string(error.what()).find("\"cuda_graphs\": true, but the device is the CPU"),
              std::string::npos)
        << error.what();
  }
}

TEST(CudaGraphs, AutoOnTheCpuIsOffWithoutANote) {
  const TrainingPlan plan = plan_training(demo_config({"device=cpu"}));
  EXPECT_FALSE(plan.cuda_graphs);
  for (const auto& note : plan.setting_notes)
    EXPECT_EQ(note.find("cuda_graphs"), std::string::npos);
  EXPECT_NE(format_plan(plan).find("cuda_graphs off"), std::string::npos);
}

// Ten fp16 steps of the demo with prior preservation and gradient checkpointing, 8-bit AdamW:
// captured and eager. The kernels are the same, but cuDNN's backward convolutions may add in
// another order from run to run, so the losses are compared to 1e-2 relative, not bit for bit.
TEST(CudaGraphs, TheDemoGivesTheEagerLossesOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const fs::path dir = sdtrain::testing::scratch_dir();
  nlohmann::json settings = {{"device", "cuda"},
                             {"mixed_precision", "fp16"},
                             {"optimizer", "adamw8bit"},
                             {"gradient_checkpointing", true},
                             {"with_prior_preservation", true},
                             {"num_class_images", 4}};
  std::map<std::string, std::vector<double>> runs;
  for (const std::string mode : {"captured", "eager"}) {
    settings["cuda_graphs"] = mode == "captured";
    fs::create_directories(dir / mode);
    const auto result = sdtrain::testing::run_sdtrain(
        "--config " + sdtrain::testing::write_config(dir / mode, settings).string());
    ASSERT_EQ(result.code, 0) << result.output;
    const bool captured = result.output.find("is captured") != std::string::npos;
    EXPECT_EQ(captured, mode == "captured") << result.output;
    runs[mode] = losses(dir / mode / "out");
  }
  ASSERT_EQ(runs["captured"].size(), 10u);
  ASSERT_EQ(runs["eager"].size(), 10u);
  for (size_t i = 0; i < 10; ++i)
    EXPECT_NEAR(runs["captured"][i], runs["eager"][i], 1e-2 * std::abs(runs["eager"][i]))
        << "step " << i + 1;
}
