#pragma once
// Where a training step's time goes, for developers (docs/benchmarks.md): with
//   SDTRAIN_PROFILE=FIRST:COUNT:TRACE.json
// in the environment, optimizer steps FIRST+1 .. FIRST+COUNT run under LibTorch's Kineto
// profiler (CPU operators, CUDA runtime calls, kernels and copies), the trace is written as a
// Chrome trace (chrome://tracing, Perfetto; tools/summarize_trace.py tabulates it) and the
// window's wall time is logged. Without the variable every call does nothing.

#include <torch/torch.h>

#include <chrono>
#include <cstdint>
#include <string>

namespace sdtrain::train {

class StepProfiler {
 public:
  // Reads SDTRAIN_PROFILE; a malformed value is a ConfigError naming the variable.
  static StepProfiler from_environment(torch::Device device);

  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;
  StepProfiler(StepProfiler&& other) noexcept;
  StepProfiler& operator=(StepProfiler&&) = delete;
  ~StepProfiler();

  // Called whenever `steps_done` optimizer steps are complete and the next has not started:
  // starts the window at FIRST and ends it at FIRST + COUNT.
  void at_step_boundary(int64_t steps_done);

 private:
  StepProfiler(torch::Device device, int64_t first, int64_t count, std::string trace);
  void start();
  void stop();

  torch::Device device_;
  int64_t first_ = -1;  // -1: not requested
  int64_t count_ = 0;
  std::string trace_;
  bool active_ = false;
  std::chrono::steady_clock::time_point started_;
};

}  // namespace sdtrain::train
