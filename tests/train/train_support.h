#pragma once
// What the end-to-end training tests share: a config over the bundled demo, and running the
// executable as a child process that a test can stop with a signal.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "test_support.h"

namespace sdtrain::testing {

inline std::filesystem::path demo() { return source_dir() / "configs" / "demo"; }

// A training config over the demo model and photos, written to dir/config.json. Class images:
// the demo photos themselves (num_class_images = their count), so no sampling is needed.
inline std::filesystem::path write_config(const std::filesystem::path& dir, const nlohmann::json& overrides) {
  namespace fs = std::filesystem;
  const fs::path classes = dir / "class_images";
  if (!fs::exists(classes)) {
    fs::create_directories(classes);
    for (const auto& entry : fs::directory_iterator(demo() / "instance")) {
      if (entry.path().extension() != ".json") fs::copy_file(entry.path(), classes / entry.path().filename());
    }
  }
  nlohmann::json config = {{"pretrained_model_name_or_path", (demo() / "model").string()},
                           {"instance_data_dir", (demo() / "instance").string()},
                           {"class_data_dir", classes.string()},
                           {"output_dir", (dir / "out").string()},
                           {"resolution", 64},
                           {"center_crop", true},
                           {"train_batch_size", 1},
                           {"max_steps", 10},
                           {"learning_rate", 1e-4},
                           {"checkpointing_steps", 1000},
                           {"seed", 7},
                           {"device", "cpu"}};
  if (overrides.is_object()) config.update(overrides);
  const fs::path path = dir / "config.json";
  std::ofstream(path) << config.dump(2);
  return path;
}

// The GPU tests' demo run: fp16, gradient checkpointing, prior preservation (the demo photos as
// class images) and 8-bit AdamW on CUDA, the step the benchmark's `today` row times.
inline nlohmann::json gpu_demo_settings() {
  return {{"device", "cuda"},
          {"mixed_precision", "fp16"},
          {"optimizer", "adamw8bit"},
          {"gradient_checkpointing", true},
          {"with_prior_preservation", true},
          {"num_class_images", 4}};
}

// The loss of each line of output_dir/logs/metrics.jsonl, in order.
inline std::vector<double> logged_losses(const std::filesystem::path& output_dir) {
  std::vector<double> values;
  std::ifstream metrics(output_dir / "logs" / "metrics.jsonl");
  for (std::string line; std::getline(metrics, line);)
    values.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return values;
}

// Starts `sdtrain --config config [extra]` with stderr in dir/log.txt and `environment`
// (NAME=VALUE) added; returns its PID.
inline pid_t start_sdtrain(const std::filesystem::path& dir, const std::filesystem::path& config,
                           const std::vector<std::string>& environment = {}) {
  const pid_t child = ::fork();
  if (child == 0) {
    const std::string exe = sdtrain_exe();
    const std::string log = (dir / "log.txt").string();
    if (!::freopen(log.c_str(), "w", stderr)) ::_exit(126);
    for (const auto& assignment : environment) ::putenv(const_cast<char*>(assignment.c_str()));
    ::execl(exe.c_str(), exe.c_str(), "--config", config.c_str(), static_cast<char*>(nullptr));
    ::_exit(127);
  }
  return child;
}

// Waits (at most `seconds`) until ready() holds; false on time-out.
inline bool wait_until(const std::function<bool()>& ready, int seconds = 60) {
  for (int i = 0; i < seconds * 10; ++i) {
    if (ready()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  return false;
}

// Sends `signal` to the child and returns its wait status.
inline int stop_sdtrain(pid_t child, int signal) {
  ::kill(child, signal);
  int status = 0;
  ::waitpid(child, &status, 0);
  return status;
}

// Starts `sdtrain --config config` (stderr to dir/log.txt), waits until `ready()` or 60 s, then
// sends SIGTERM as a spot reclaim would; returns the wait status.
inline int run_and_terminate(const std::filesystem::path& dir, const std::filesystem::path& config,
                             const std::function<bool()>& ready) {
  const pid_t child = start_sdtrain(dir, config);
  wait_until(ready);
  return stop_sdtrain(child, SIGTERM);
}

}  // namespace sdtrain::testing
