// cuda_graphs (include/sdtrain/train/micro_batch_pass.h, docs/performance.md). On the CPU: what
// stands in the way of a capture is named, `true` refuses it before anything is loaded, `auto`
// says nothing where there is no GPU. On a GPU (skipped without one): the demo trained with its
// passes replayed from a graph logs the capture and gives the eager run's losses, in the exact
// and lean modes too (the optimizer's steps in the graph); a captured run resumes after SIGKILL
// and SIGTERM, capturing anew, and samples validation images.
#include "sdtrain/train/micro_batch_pass.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/train/plan.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "train_support.h"

namespace fs = std::filesystem;
using namespace sdtrain;
using namespace sdtrain::train;

namespace {

TrainConfig demo_config(const std::vector<std::string>& overrides) {
  return load_train_config(sdtrain::testing::source_dir() / "configs" / "demo.json", overrides);
}

// Each logged step's loss, by step: a resumed run's metrics continue its first run's.
std::map<int64_t, double> losses_by_step(const fs::path& output_dir) {
  std::map<int64_t, double> values;
  std::ifstream metrics(output_dir / "logs" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto record = nlohmann::json::parse(line);
    values[record["step"].get<int64_t>()] = record["loss"].get<double>();
  }
  return values;
}

bool logs_capture(const std::string& output) {
  return output.find("cuda_graphs: the forward and backward pass is captured") != std::string::npos;
}

size_t occurrences(const std::string& text, const std::string& what) {
  size_t count = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++count;
  return count;
}

// The largest peak_memory_bytes and peak_reserved_bytes of a run's metrics.
std::pair<int64_t, int64_t> peak_memory(const fs::path& output_dir) {
  std::pair<int64_t, int64_t> peaks{0, 0};
  std::ifstream metrics(output_dir / "logs" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);) {
    const auto record = nlohmann::json::parse(line);
    peaks.first = std::max(peaks.first, record.at("peak_memory_bytes").get<int64_t>());
    peaks.second = std::max(peaks.second, record.at("peak_reserved_bytes").get<int64_t>());
  }
  return peaks;
}

}  // namespace

TEST(CudaGraphs, EachObstacleIsNamed) {
  EXPECT_FALSE(cuda_graph_obstacle(true, false, false, "adamw", 1, 0.0).has_value());
  // adamw8bit's steps inside the backward pass are captured with it.
  EXPECT_FALSE(cuda_graph_obstacle(true, false, true, "adamw8bit", 1, 0.0).has_value());
  EXPECT_NE(cuda_graph_obstacle(false, false, false, "adamw8bit", 1, 0.0)->find("CPU"),
            std::string::npos);
  EXPECT_NE(cuda_graph_obstacle(true, true, false, "adamw8bit", 1, 0.0)->find("data parallel"),
            std::string::npos);
  const auto fused_adamw = cuda_graph_obstacle(true, false, true, "adamw", 1, 0.0);
  ASSERT_TRUE(fused_adamw.has_value());
  EXPECT_NE(fused_adamw->find("fused_backward_pass"), std::string::npos);
  EXPECT_NE(fused_adamw->find("optimizer adamw"), std::string::npos);
  EXPECT_NE(cuda_graph_obstacle(true, false, false, "adamw8bit", 2, 0.0)->find("gradient_accumulation_steps"),
            std::string::npos);
  // LoRA dropout draws other masks in the eager reference pass and in the replay.
  EXPECT_NE(cuda_graph_obstacle(true, false, false, "adamw", 1, 0.1)->find("lora_dropout"),
            std::string::npos);
}

// fp16's first passes may overflow at the scaler's initial scale: such a pass is no reference
// for the check of a replay, and the capture waits for a finite one.
TEST(CudaGraphs, AnOverflowedPassIsNoReference) {
  const torch::Tensor finite = torch::tensor({{1.0, 2.0}, {-3.0, 9.0}});
  EXPECT_TRUE(reference_is_finite(0.5, finite));
  EXPECT_FALSE(reference_is_finite(std::numeric_limits<double>::infinity(), finite));
  EXPECT_FALSE(reference_is_finite(std::nan(""), finite));
  for (const double bad : {std::numeric_limits<double>::infinity(), std::nan("")}) {
    torch::Tensor gradients = finite.clone();
    gradients[1][1] = bad;
    EXPECT_FALSE(reference_is_finite(0.5, gradients)) << bad;
  }
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

namespace {

// || captured update - eager update || / || eager update || over the trained UNet's saved
// weights, the update being the saved weights less the base model's.
double relative_update_difference(const fs::path& captured, const fs::path& eager) {
  const auto file = "unet/diffusion_pytorch_model.safetensors";
  const sdtrain::io::SafetensorsFile base(sdtrain::testing::demo() / "model" / file),
      a(captured / file), b(eager / file);
  double difference = 0, update = 0;
  for (const auto& entry : b.tensors()) {
    const torch::Tensor start = base.tensor(entry.name).to(torch::kDouble);
    const torch::Tensor eager_update = b.tensor(entry.name).to(torch::kDouble) - start;
    const torch::Tensor captured_update = a.tensor(entry.name).to(torch::kDouble) - start;
    difference += (captured_update - eager_update).pow(2).sum().item<double>();
    update += eager_update.pow(2).sum().item<double>();
  }
  return update > 0 ? std::sqrt(difference / update) : 1.0;
}

// Ten fp16 steps of the demo, captured and eager, with `extra` over prior preservation,
// gradient checkpointing and 8-bit AdamW. The kernels are the same, but cuDNN's backward
// convolutions may add in another order from run to run, so the losses are compared to 1e-2
// relative, not bit for bit. The losses alone would not show an optimizer step the graph lost
// (ten steps at 1e-4 barely move them), so the weights' updates are compared too: within 10 %
// of the eager update's norm (8-bit AdamW's steps are about lr per element whatever the
// gradient's rounding; a lost or stale step differs by the whole update). `name`: the run's
// folder under the test's scratch folder.
void expect_captured_losses_equal_eager(const std::string& name, const nlohmann::json& extra,
                                        const std::string& captured_line) {
  const fs::path dir = sdtrain::testing::scratch_dir() / name;
  nlohmann::json settings = sdtrain::testing::gpu_demo_settings();
  settings.update(extra);
  std::map<std::string, std::vector<double>> runs;
  for (const std::string mode : {"captured", "eager"}) {
    settings["cuda_graphs"] = mode == "captured";
    fs::create_directories(dir / mode);
    const auto result = sdtrain::testing::run_sdtrain(
        "--config " + sdtrain::testing::write_config(dir / mode, settings).string());
    ASSERT_EQ(result.code, 0) << result.output;
    const bool captured = result.output.find(captured_line) != std::string::npos;
    EXPECT_EQ(captured, mode == "captured") << result.output;
    runs[mode] = sdtrain::testing::logged_losses(dir / mode / "out");
  }
  ASSERT_EQ(runs["captured"].size(), 10u);
  ASSERT_EQ(runs["eager"].size(), 10u);
  for (size_t i = 0; i < 10; ++i)
    EXPECT_NEAR(runs["captured"][i], runs["eager"][i], 1e-2 * std::abs(runs["eager"][i]))
        << name << " step " << i + 1;
  // bf16-stored weights take each update with stochastic rounding, at about the update's
  // size: their updates are not compared this way.
  if (!extra.contains("weight_dtype"))
    EXPECT_LE(relative_update_difference(dir / "captured" / "out", dir / "eager" / "out"), 0.1)
        << name;
}

}  // namespace

TEST(CudaGraphs, TheDemoGivesTheEagerLossesOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  expect_captured_losses_equal_eager("today", nlohmann::json::object(),
                                     "cuda_graphs: the forward and backward pass is captured;");
}

// The exact and lean modes (docs/memory.md): adamw8bit steps each tensor inside the backward
// pass, and the graph holds those steps (the arguments written before each replay).
TEST(CudaGraphs, TheExactModeGivesTheEagerLossesOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const std::string line = "is captured, with the optimizer's steps in it";
  const nlohmann::json exact = {
      {"fused_backward_pass", true}, {"cache_latents", true}, {"max_grad_norm", 0}};
  expect_captured_losses_equal_eager("exact", exact, line);
  nlohmann::json lean = exact;
  lean["weight_dtype"] = "bf16";
  expect_captured_losses_equal_eager("lean", lean, line);
}

// With graphs on (true: a failed capture would stop the run), a run killed at step 5 resumes
// from checkpoint-4, captures anew in the new process and gives the uninterrupted run's losses
// for steps 5..8 (1e-2 relative: the reason above); validation at step 4 samples between
// replays, having released the graph, which step 5 captures again (validation at step 8, the
// last, releases it for good); SIGTERM stops a captured run at a step boundary with exit 143
// and a checkpoint, from which a run resumes and captures again. metrics.jsonl carries the
// peak reserved memory, never below the peak allocated.
TEST(CudaGraphs, ResumeSigtermValidationAndCheckpointsWorkWithGraphsOn) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  using namespace sdtrain::testing;
  const fs::path dir = scratch_dir();
  nlohmann::json settings = gpu_demo_settings();
  settings.update({{"cuda_graphs", true},
                   {"max_steps", 8},
                   {"checkpointing_steps", 2},
                   {"validation_prompts", {"a photo of sks robot"}},
                   {"validation_steps", 4},
                   {"num_validation_images", 1}});
  fs::create_directories(dir / "whole");
  const auto whole = run_sdtrain("--config " + write_config(dir / "whole", settings).string());
  ASSERT_EQ(whole.code, 0) << whole.output;
  EXPECT_TRUE(logs_capture(whole.output)) << whole.output;
  EXPECT_EQ(occurrences(whole.output, "cuda_graphs: the pass is captured again"), 1u)
      << whole.output;
  EXPECT_TRUE(fs::exists(dir / "whole" / "out" / "samples" / "step-4.png"));
  const auto [allocated, reserved] = peak_memory(dir / "whole" / "out");
  EXPECT_GT(allocated, 0);
  EXPECT_GE(reserved, allocated);
  const auto uninterrupted = losses_by_step(dir / "whole" / "out");
  ASSERT_EQ(uninterrupted.size(), 8u);

  fs::create_directories(dir / "killed");
  const fs::path killed_config = write_config(dir / "killed", settings);
  int status = 0;
  ::waitpid(start_sdtrain(dir / "killed", killed_config, {"SDTRAIN_KILL_AT=step#5"}), &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL) << read_file(dir / "killed" / "log.txt");
  const auto resumed =
      run_sdtrain("--config " + killed_config.string() + " --set resume_from_checkpoint=latest");
  ASSERT_EQ(resumed.code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("checkpoint-4"), std::string::npos) << resumed.output;
  EXPECT_TRUE(logs_capture(resumed.output)) << "the graph is rebuilt after a resume\n" << resumed.output;
  const auto after_resume = losses_by_step(dir / "killed" / "out");
  for (int64_t step = 5; step <= 8; ++step) {
    ASSERT_TRUE(after_resume.count(step)) << "step " << step;
    EXPECT_NEAR(after_resume.at(step), uninterrupted.at(step), 1e-2 * std::abs(uninterrupted.at(step)))
        << "step " << step;
  }

  nlohmann::json endless = settings;
  endless["max_steps"] = 100000;
  endless["checkpointing_steps"] = 100000;
  endless["validation_prompts"] = nlohmann::json::array();
  fs::create_directories(dir / "stopped");
  const fs::path stopped_config = write_config(dir / "stopped", endless);
  const fs::path metrics = dir / "stopped" / "out" / "logs" / "metrics.jsonl";
  const pid_t child = start_sdtrain(dir / "stopped", stopped_config);
  ASSERT_TRUE(wait_until([&] { return losses_by_step(dir / "stopped" / "out").size() >= 3; }, 300))
      << read_file(dir / "stopped" / "log.txt");
  status = stop_sdtrain(child, SIGTERM);
  const std::string stopped_log = read_file(dir / "stopped" / "log.txt");
  ASSERT_TRUE(WIFEXITED(status)) << stopped_log;
  EXPECT_EQ(WEXITSTATUS(status), 143) << stopped_log;
  EXPECT_TRUE(logs_capture(stopped_log)) << stopped_log;
  const int64_t stopped_at = losses_by_step(dir / "stopped" / "out").rbegin()->first;
  ASSERT_TRUE(fs::exists(dir / "stopped" / "out" / ("checkpoint-" + std::to_string(stopped_at))))
      << stopped_log;
  const auto continued = run_sdtrain("--config " + stopped_config.string() + " --set max_steps=" +
                                     std::to_string(stopped_at + 2) +
                                     " --set resume_from_checkpoint=latest");
  ASSERT_EQ(continued.code, 0) << continued.output;
  EXPECT_TRUE(logs_capture(continued.output)) << continued.output;
  EXPECT_EQ(losses_by_step(dir / "stopped" / "out").rbegin()->first, stopped_at + 2);
}
