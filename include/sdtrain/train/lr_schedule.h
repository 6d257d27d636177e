#pragma once
// Learning-rate schedules, as diffusers' optimization.get_scheduler builds them for
// train_dreambooth.py: a multiplier lambda(step) of the base learning rate, where `step`
// counts the optimizer steps already taken (PyTorch's LambdaLR, stepped once after every
// optimizer step). The rate used by optimizer step k (0-based) is learning_rate * lambda(k), so
// a resumed run needs only the step count to continue the schedule.

#include <cstdint>
#include <string>
#include <vector>

#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

struct LrScheduleOptions {
  std::string name = "constant";  // one of lr_schedule_names()
  double learning_rate = 0;       // the base (peak) rate
  int64_t warmup_steps = 0;       // not used by "constant", as in diffusers
  int64_t total_steps = 0;        // optimizer steps of the whole run
  int num_cycles = 1;             // hard restarts of cosine_with_restarts
  double power = 1.0;             // polynomial power
  double lr_end = 1e-7;  // polynomial's final rate (diffusers' default, not configurable there)
};

// The schedule names diffusers' train_dreambooth.py offers (TrainConfig accepts the same).
const std::vector<std::string>& lr_schedule_names();

// lr_scheduler, lr_warmup_steps, lr_num_cycles, lr_power and learning_rate of the configuration
// for a run of `total_steps` optimizer steps (the plan's total_steps). With scale_lr the base
// rate is learning_rate x train_batch_size x gradient_accumulation_steps x `processes`, as
// diffusers' --scale_lr (accelerator.num_processes): callers use this rate and do not scale again.
LrScheduleOptions lr_schedule_options(const TrainConfig& config, int64_t total_steps,
                                      int64_t processes = 1);

// Throws ConfigError for an unknown name or a combination diffusers rejects (polynomial with
// learning_rate <= lr_end).
void check_lr_schedule(const LrScheduleOptions& options);

// The learning rate for optimizer step `step` (0-based). Validates the options first.
double learning_rate_at(const LrScheduleOptions& options, int64_t step);

}  // namespace sdtrain::train
