#include "sdtrain/train/step_profiler.h"

#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstdlib>
#include <regex>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::train {

namespace {

namespace profiler = torch::autograd::profiler;
using torch::profiler::impl::ActivityType;
using torch::profiler::impl::ProfilerConfig;
using torch::profiler::impl::ProfilerState;

std::set<ActivityType> activities_for(torch::Device device) {
  std::set<ActivityType> activities = {ActivityType::CPU};
  if (device.is_cuda()) activities.insert(ActivityType::CUDA);
  return activities;
}

// Whole steps only: the device finishes the work queued so far before the window opens or
// closes, so kernels of a step outside the window are not counted in it.
void wait_for_device(torch::Device device) {
  if (device.is_cuda()) torch::cuda::synchronize();
}

}  // namespace

StepProfiler StepProfiler::from_environment(torch::Device device) {
  const char* value = std::getenv("SDTRAIN_PROFILE");
  if (value == nullptr || *value == '\0') return StepProfiler(device, -1, 0, "");
  static const std::regex pattern("([0-9]+):([0-9]+):(.+)");
  std::cmatch match;
  if (!std::regex_match(value, match, pattern) || std::stoll(match[2]) == 0) {
    throw ConfigError(
        std::string("SDTRAIN_PROFILE=") + value +
        ": expected FIRST:COUNT:TRACE.json, e.g. SDTRAIN_PROFILE=20:5:/tmp/trace.json "
        "(steps 21 to 25); unset it to train without profiling");
  }
  return StepProfiler(device, std::stoll(match[1]), std::stoll(match[2]), match[3]);
}

StepProfiler::StepProfiler(torch::Device device, int64_t first, int64_t count, std::string trace)
    : device_(device), first_(first), count_(count), trace_(std::move(trace)) {}

StepProfiler::StepProfiler(StepProfiler&& other) noexcept
    : device_(other.device_),
      first_(other.first_),
      count_(other.count_),
      trace_(std::move(other.trace_)),
      active_(other.active_),
      started_(other.started_) {
  other.active_ = false;
  other.first_ = -1;
}

StepProfiler::~StepProfiler() {
  if (!active_) return;
  try {
    (void)profiler::disableProfiler();  // the run ended inside the window: nothing is written
  } catch (...) {
  }
}

void StepProfiler::at_step_boundary(int64_t steps_done) {
  if (first_ < 0) return;
  if (!active_ && steps_done == first_)
    start();
  else if (active_ && steps_done == first_ + count_)
    stop();
}

void StepProfiler::start() {
  const ProfilerConfig config(ProfilerState::KINETO);
  profiler::prepareProfiler(config, activities_for(device_));
  wait_for_device(device_);
  profiler::enableProfiler(config, activities_for(device_));
  started_ = std::chrono::steady_clock::now();
  active_ = true;
}

void StepProfiler::stop() {
  wait_for_device(device_);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started_).count();
  std::unique_ptr<profiler::ProfilerResult> result = profiler::disableProfiler();
  active_ = false;
  // Beside the target first, then renamed: a trace is either whole or absent.
  const std::filesystem::path temporary = temporary_path_for(trace_);
  result->save(temporary.string());
  std::filesystem::rename(temporary, trace_);
  log::info(log::str("profile: steps ", first_ + 1, " to ", first_ + count_, " took ", seconds,
                     " s (", seconds / static_cast<double>(count_), " s/step); trace: ", trace_));
}

}  // namespace sdtrain::train
