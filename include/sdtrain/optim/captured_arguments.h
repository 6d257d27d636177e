#pragma once
// The per-step arguments of optimizer updates captured in a CUDA graph
// (Optimizer::begin_graph_capture). A captured kernel reads its argument table from the same
// device address at every replay, so what changes from step to step (the learning rate, the
// bias corrections of the step count, the stochastic-rounding seed, the skip flag) is written
// into that table by the host before each replay, with the constants computed exactly as an
// eager step computes them (AdamW8bit::step_constants): the replayed update is the eager one.

#include <torch/torch.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "sdtrain/optim/optimizer.h"

namespace sdtrain::optim {

// Where one captured tensor update keeps its per-step fields in the table.
struct CapturedArgument {
  size_t parameter = 0;         // the optimizer's parameter index
  size_t constants_at = 0;      // byte offset of its AdamStepConstants
  size_t skip_at = 0;           // byte offset of its skip-flag pointer
  const float* skip = nullptr;  // the flag it was captured with (null: none)
};

struct CapturedArguments {
  std::vector<std::uint8_t> table;  // the tables of every captured launch, as the host holds them
  size_t used = 0;                  // bytes of `table` in use
  std::vector<CapturedArgument> arguments;
  torch::Tensor device;  // uint8, as large as `table`: where the captured kernels read them
};

// Before a replay: for each captured argument, the parameter's step count (`step_count`, which
// this advances) goes up by one and the constants of the new count and the captured skip
// flag are written into the table. `dry`: the counts stay, and each skip pointer becomes
// `dry_skip` (a device flag holding a nonzero value), so that the replay updates nothing.
void write_replay_arguments(CapturedArguments& captured, const OptimizerOptions& options,
                            const std::function<int64_t&(size_t)>& step_count, bool dry,
                            const float* dry_skip);

}  // namespace sdtrain::optim
