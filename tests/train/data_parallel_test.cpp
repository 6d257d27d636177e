// Data parallel under torchrun (docs/scaling.md), on the CPU with Gloo: two processes with
// train_batch_size 1 train what one process with train_batch_size 2 trains (the same global
// batches, noise and timesteps), up to the order in which gradients are summed; one process
// killed mid-run stops the other with exit code 8, and the last checkpoint resumes in a single
// process (another world size). Skipped, visibly, without the reference environment's torch.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace sdtrain::testing;

namespace {

// torchrun, as the reference environment's python runs it (the same module as the script).
std::string torchrun() {
  const std::string python = reference_python();
  if (python.empty() || run_command(python + " -c 'import torch.distributed.run'") != 0) return "";
  return python + " -m torch.distributed.run";
}

CommandResult run(const std::string& command) {
  CommandResult result;
  result.code = run_command("timeout 600 " + command, &result.output);
  return result;
}

CommandResult torchrun_sdtrain(const fs::path& config, const std::string& environment = "") {
  // --standalone: a free port on this machine; OMP_NUM_THREADS=1 as torchrun sets it anyway.
  return run("env " + environment + " OMP_NUM_THREADS=1 " + torchrun() +
             " --standalone --nproc-per-node 2 --no-python " + sdtrain_exe() + " --config " +
             config.string());
}

json dp_config(int batch, int steps, int checkpointing_steps) {
  return {{"with_prior_preservation", true},
          {"class_prompt", "a photo of a robot"},
          {"num_class_images", 4},
          {"train_batch_size", batch},
          {"max_steps", steps},
          {"checkpointing_steps", checkpointing_steps}};
}

std::vector<double> losses(const fs::path& output_dir) {
  std::vector<double> values;
  std::ifstream in(output_dir / "logs" / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) values.push_back(json::parse(line)["loss"]);
  return values;
}

struct Difference {
  double max = 0;
  double mean = 0;
};

Difference weight_difference(const fs::path& a, const fs::path& b) {
  const auto file = "unet/diffusion_pytorch_model.safetensors";
  const sdtrain::io::SafetensorsFile left(a / file), right(b / file);
  Difference d;
  double sum = 0;
  int64_t count = 0;
  for (const auto& entry : left.tensors()) {
    const torch::Tensor diff =
        (left.tensor(entry.name) - right.tensor(entry.name)).abs().to(torch::kDouble);
    d.max = std::max(d.max, diff.max().item<double>());
    sum += diff.sum().item<double>();
    count += diff.numel();
  }
  d.mean = sum / static_cast<double>(count);
  return d;
}

TEST(DataParallel, TwoProcessesTrainWhatOneProcessWithTheGlobalBatchTrains) {
  if (torchrun().empty())
    GTEST_SKIP() << "no torchrun in the reference environment (scripts/setup.sh)";
  const fs::path dir = scratch_dir();
  fs::create_directories(dir / "two");
  fs::create_directories(dir / "one");
  fs::create_directories(dir / "small");
  // The text encoder trained too, and 64 KiB buckets: many buckets, started in the same order
  // on both processes as their gradients arrive (the UNet's, then the text encoder's).
  auto with_text_encoder = [](int batch) {
    json settings = dp_config(batch, 4, 1000);
    settings["train_text_encoder"] = true;
    return settings;
  };
  const CommandResult two = torchrun_sdtrain(write_config(dir / "two", with_text_encoder(1)),
                                             "SDTRAIN_BUCKET_BYTES=65536");
  ASSERT_EQ(two.code, 0) << two.output;
  EXPECT_NE(two.output.find("data parallel: 2 processes (gloo)"), std::string::npos) << two.output;
  const auto buckets_at = two.output.find("gradients in ");
  ASSERT_NE(buckets_at, std::string::npos) << two.output;
  EXPECT_GT(std::stoi(two.output.substr(buckets_at + 13)), 10) << two.output;
  const CommandResult one =
      run(sdtrain_exe() + " --config " + write_config(dir / "one", with_text_encoder(2)).string());
  ASSERT_EQ(one.code, 0) << one.output;
  const CommandResult small = run(sdtrain_exe() + " --config " +
                                  write_config(dir / "small", with_text_encoder(1)).string());
  ASSERT_EQ(small.code, 0) << small.output;

  // The loss of each step, over both processes' samples, is the one process's loss.
  const auto two_losses = losses(dir / "two" / "out"), one_losses = losses(dir / "one" / "out");
  ASSERT_EQ(two_losses.size(), 4u);
  ASSERT_EQ(one_losses.size(), 4u);
  for (size_t i = 0; i < 4; ++i)
    EXPECT_NEAR(two_losses[i], one_losses[i], 1e-5 * one_losses[i]) << i;

  const Difference parallel = weight_difference(dir / "two" / "out", dir / "one" / "out");
  const Difference other_batch = weight_difference(dir / "small" / "out", dir / "one" / "out");
  std::cout << "two processes vs one (global batch 2): max " << parallel.max << ", mean "
            << parallel.mean << "; batch 1 vs batch 2: max " << other_batch.max << ", mean "
            << other_batch.mean << "\n";
  // Tolerance: the gradients differ only in the order their float32 terms are summed (two
  // per-process means averaged, against one mean over the batch), about 1e-7 relative; AdamW
  // divides by sqrt(v), so an element whose gradient is near zero can move by up to its
  // step size (lr 1e-4) per step either way. Hence the max may reach 2 x lr x 4 steps, while the
  // mean difference must stay three orders of magnitude below that of another global batch.
  EXPECT_LE(parallel.max, 2 * 1e-4 * 4);
  EXPECT_LT(parallel.mean, other_batch.mean * 1e-3);
}

TEST(DataParallel, AKilledProcessStopsTheRunAndItsCheckpointResumesInOneProcess) {
  if (torchrun().empty())
    GTEST_SKIP() << "no torchrun in the reference environment (scripts/setup.sh)";
  const fs::path dir = scratch_dir();
  const fs::path config = write_config(dir, dp_config(1, 6, 3));
  // Rank 1 dies after its fifth step: rank 0 is then in step 6's collectives, which fail at
  // once; rank 0 says so and exits 8, unless torchrun's SIGTERM (sent as soon as it sees rank 1
  // die) ends it first. Had the SIGTERM come at a step boundary, rank 0 would have saved step 5
  // and exited 143. Every way, the run ends non-zero with its checkpoints whole.
  const CommandResult killed = torchrun_sdtrain(config, "SDTRAIN_KILL_AT=step#5@1");
  EXPECT_NE(killed.code, 0) << killed.output;
  const bool peer_lost = killed.output.find("lost another process of the run") != std::string::npos;
  const bool terminated = fs::exists(dir / "out" / "checkpoint-5");
  EXPECT_TRUE(peer_lost || terminated) << killed.output;
  ASSERT_TRUE(fs::exists(dir / "out" / "checkpoint-3" / "trainer_state.json"));
  EXPECT_FALSE(fs::exists(dir / "out" / "model_index.json"));

  // One process: global batches of 1 instead of 2. Checkpoint 3 (or 5) is one global batch, 2
  // samples, into its epoch: micro-batch 2 of it now.
  const CommandResult resumed =
      run(sdtrain_exe() + " --config " + config.string() + " --set resume_from_checkpoint=latest");
  ASSERT_EQ(resumed.code, 0) << resumed.output;
  EXPECT_NE(resumed.output.find("continuing at micro-batch 2 of epoch"), std::string::npos)
      << resumed.output;
  EXPECT_TRUE(fs::exists(dir / "out" / "model_index.json"));
  EXPECT_EQ(losses(dir / "out").size(), 6u);
}

// Missing class images are generated by both processes, each its share, and are the images one
// process generates (image k is drawn from seed + k, whoever draws it).
TEST(DataParallel, ClassImagesAreGeneratedByEveryProcess) {
  if (torchrun().empty())
    GTEST_SKIP() << "no torchrun in the reference environment (scripts/setup.sh)";
  const fs::path dir = scratch_dir();
  for (const char* run_name : {"two", "one"}) {
    fs::create_directories(dir / run_name);
    json settings = dp_config(1, 1, 1000);
    settings["class_data_dir"] = (dir / run_name / "generated").string();
    settings["prior_generation_steps"] = 2;
    settings["sample_batch_size"] = 1;
    const fs::path config = write_config(dir / run_name, settings);
    // One thread in both, as torchrun sets: the same arithmetic, so the same bytes.
    const CommandResult result =
        std::string(run_name) == "two"
            ? torchrun_sdtrain(config)
            : run("env OMP_NUM_THREADS=1 " + sdtrain_exe() + " --config " + config.string());
    ASSERT_EQ(result.code, 0) << result.output;
  }
  int images = 0;
  for (const auto& entry : fs::directory_iterator(dir / "one" / "generated")) {
    ++images;
    const fs::path twin = dir / "two" / "generated" / entry.path().filename();
    ASSERT_TRUE(fs::exists(twin)) << twin;
    EXPECT_TRUE(sdtrain::read_file(entry.path()) == sdtrain::read_file(twin)) << twin;
  }
  EXPECT_EQ(images, 4);
}

// The NCCL path on a one-GPU machine (NCCL refuses two processes on one GPU): one process under
// torchrun trains through the process group and the bucketed all-reduce.
TEST(DataParallel, OneProcessOnTheGpuGoesThroughNccl) {
  if (torchrun().empty())
    GTEST_SKIP() << "no torchrun in the reference environment (scripts/setup.sh)";
  if (!torch::cuda::is_available()) GTEST_SKIP() << "needs a CUDA GPU";
  const fs::path dir = scratch_dir();
  json settings = dp_config(1, 4, 1000);
  settings["device"] = "cuda";
  const fs::path config = write_config(dir, settings);
  const CommandResult one =
      run("OMP_NUM_THREADS=1 " + torchrun() + " --standalone --nproc-per-node 1 --no-python " +
          sdtrain_exe() + " --config " + config.string());
  ASSERT_EQ(one.code, 0) << one.output;
  EXPECT_NE(one.output.find("data parallel: 1 processes (nccl)"), std::string::npos) << one.output;
  EXPECT_EQ(losses(dir / "out").size(), 4u);
}

}  // namespace
