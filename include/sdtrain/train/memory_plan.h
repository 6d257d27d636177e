#pragma once
// The lean-memory settings of a run (docs/memory.md): whether the optimizer steps inside the
// backward pass, what that changes or refuses, the checks of lean mode (bf16 weights), the
// memory estimate on the run's own accounting, and the choice of settings under memory_budget.
// All decided once, by the plan, before any weight loads.

#include <cstdint>
#include <string>
#include <vector>

#include "sdtrain/train/plan.h"
#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

// fused_backward_pass resolved: on/off, plus a line for every setting whose meaning it changes
// (or, for "auto", why it chose on). Throws ConfigError for combinations it refuses.
bool decide_fused_backward_pass(const TrainConfig& config, std::vector<std::string>& notes);

// weight_dtype "bf16" (lean mode): refuses what cannot work (ConfigError) and notes what it
// changes. Nothing for "fp32".
void check_lean_weights(const TrainConfig& config, std::vector<std::string>& notes);

// Bytes on the training device at the peak of a step under `config`, by item, on the same
// accounting as the run: trained weights in weight_dtype, gradients (all, or the largest two
// tensors in flight with fused_backward_pass), optimizer state, frozen weights that stay on
// the device, and activations (measured per sample at 512^2 on SD 2.1-base, scaled by the
// pixels and the UNet's size; docs/memory.md).
MemoryEstimate estimate_memory(const TrainConfig& config, const std::vector<ComponentSize>& sizes,
                               bool gpu, bool fused_backward_pass);

// memory_budget: tries the settings from the most faithful to the leanest and keeps the first
// whose estimate fits `budget_bytes`, writing the choice into `config` and a line per change
// into `notes`. Throws ConfigError naming the smallest estimate when even the leanest does
// not fit. It never turns train_text_encoder off: that changes what is trained, not how.
void choose_settings_for_budget(TrainConfig& config, const std::vector<ComponentSize>& sizes,
                                int64_t budget_bytes, std::vector<std::string>& notes);

}  // namespace sdtrain::train
