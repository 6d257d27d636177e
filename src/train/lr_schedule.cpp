#include "sdtrain/train/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <sstream>

#include "sdtrain/util/error.h"

namespace sdtrain::train {
namespace {

constexpr double kPi = 3.141592653589793;  // Python's math.pi

// The expressions below keep diffusers' operation order, so that the doubles come out equal to
// Python's floats, not merely close.

double warmup_multiplier(const LrScheduleOptions& o, int64_t step) {
  return static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, o.warmup_steps));
}

// Fraction of the post-warm-up phase done at `step`, 0 at the end of warm-up.
double decay_progress(const LrScheduleOptions& o, int64_t step) {
  return static_cast<double>(step - o.warmup_steps) /
         static_cast<double>(std::max<int64_t>(1, o.total_steps - o.warmup_steps));
}

double linear(const LrScheduleOptions& o, int64_t step) {
  if (step < o.warmup_steps) return warmup_multiplier(o, step);
  double remaining = static_cast<double>(o.total_steps - step) /
                     static_cast<double>(std::max<int64_t>(1, o.total_steps - o.warmup_steps));
  return std::max(0.0, remaining);
}

// diffusers' get_scheduler passes no num_cycles to the plain cosine: half a period, from 1 to 0.
double cosine(const LrScheduleOptions& o, int64_t step) {
  if (step < o.warmup_steps) return warmup_multiplier(o, step);
  double progress = decay_progress(o, step);
  return std::max(0.0, 0.5 * (1.0 + std::cos(kPi * 0.5 * 2.0 * progress)));
}

// num_cycles half-cosines from 1 to 0, each restarting at 1; 0 once training is over.
double cosine_with_restarts(const LrScheduleOptions& o, int64_t step) {
  if (step < o.warmup_steps) return warmup_multiplier(o, step);
  double progress = decay_progress(o, step);
  if (progress >= 1.0) return 0.0;
  return std::max(
      0.0,
      0.5 * (1.0 + std::cos(kPi * std::fmod(static_cast<double>(o.num_cycles) * progress, 1.0))));
}

// From learning_rate down to lr_end (an absolute rate, hence the division by the base rate),
// then lr_end. diffusers divides by zero at step == total_steps when warm-up fills the whole
// run; lr_end is that expression's limit.
double polynomial(const LrScheduleOptions& o, int64_t step) {
  if (step < o.warmup_steps) return warmup_multiplier(o, step);
  int64_t decay_steps = o.total_steps - o.warmup_steps;
  if (step > o.total_steps || decay_steps == 0) return o.lr_end / o.learning_rate;
  double range = o.learning_rate - o.lr_end;
  double remaining =
      1.0 - static_cast<double>(step - o.warmup_steps) / static_cast<double>(decay_steps);
  double rate = range * std::pow(remaining, o.power) + o.lr_end;
  return rate / o.learning_rate;
}

double multiplier(const LrScheduleOptions& o, int64_t step) {
  if (o.name == "constant") return 1.0;
  if (o.name == "constant_with_warmup")
    return step < o.warmup_steps ? warmup_multiplier(o, step) : 1.0;
  if (o.name == "linear") return linear(o, step);
  if (o.name == "cosine") return cosine(o, step);
  if (o.name == "cosine_with_restarts") return cosine_with_restarts(o, step);
  return polynomial(o, step);
}

}  // namespace

const std::vector<std::string>& lr_schedule_names() {
  static const std::vector<std::string> names = {"constant", "constant_with_warmup", "linear",
                                                 "cosine",   "cosine_with_restarts", "polynomial"};
  return names;
}

LrScheduleOptions lr_schedule_options(const TrainConfig& config, int64_t total_steps,
                                      int64_t processes) {
  LrScheduleOptions o;
  o.name = config.optimizer.lr_scheduler;
  o.learning_rate = config.optimizer.learning_rate;
  if (config.optimizer.scale_lr)
    o.learning_rate *= static_cast<double>(config.length.train_batch_size *
                                           config.length.gradient_accumulation_steps * processes);
  o.warmup_steps = config.optimizer.lr_warmup_steps;
  o.total_steps = total_steps;
  o.num_cycles = config.optimizer.lr_num_cycles;
  o.power = config.optimizer.lr_power;
  return o;
}

void check_lr_schedule(const LrScheduleOptions& o) {
  const auto& names = lr_schedule_names();
  if (std::find(names.begin(), names.end(), o.name) == names.end()) {
    std::string list;
    for (const auto& n : names) list += (list.empty() ? "\"" : ", \"") + n + "\"";
    throw ConfigError("\"lr_scheduler\" must be one of " + list + ", got \"" + o.name + "\"");
  }
  if (o.warmup_steps < 0 || o.total_steps < 0) {
    throw ConfigError("learning-rate schedule: warm-up steps (" + std::to_string(o.warmup_steps) +
                      ") and total steps (" + std::to_string(o.total_steps) +
                      ") cannot be negative");
  }
  if (o.name == "polynomial" && !(o.learning_rate > o.lr_end)) {
    std::ostringstream message;
    message << "\"lr_scheduler\": \"polynomial\" decays to " << o.lr_end
            << ", so \"learning_rate\" must be larger; got " << o.learning_rate;
    throw ConfigError(message.str());
  }
}

double learning_rate_at(const LrScheduleOptions& options, int64_t step) {
  check_lr_schedule(options);
  return options.learning_rate * multiplier(options, step);
}

}  // namespace sdtrain::train
