#pragma once
// The DreamBooth training run: train_dreambooth.py's semantics (see
// /docs/training.md) from a TrainingPlan to a diffusers folder in output_dir, with resumable
// checkpoints, validation images, progress and metrics on the way.

#include <filesystem>
#include <optional>
#include <string>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/train/plan.h"

namespace sdtrain::train {

struct TrainOptions {
  // Start afresh in an output_dir that already holds a run (its checkpoints are removed).
  bool overwrite = false;
  // Tests only: writes each micro-batch's inputs (latents, noise, timesteps, token ids) and
  // loss to this folder, so that tools/dreambooth_reference.py can replay the same steps with
  // diffusers' models and torch.optim.AdamW.
  std::filesystem::path dump_dir;
  // The base, opened by the caller: a subjects run shares one, with its host copy of the
  // weights (docs/scaling.md). Opened from the configuration when absent.
  std::optional<io::ModelFolder> base;
};

struct TrainSummary {
  int64_t steps = 0;  // optimizer steps taken in total (including before a resume)
  int64_t steps_this_run = 0;
  int64_t skipped_steps = 0;  // fp16 steps skipped for inf/NaN gradients
  double seconds = 0;
  double final_loss = 0;
  std::filesystem::path output_dir;
};

// Runs the whole job. Throws the documented errors; SIGINT/SIGTERM save a checkpoint and then
// throw an Error with exit code 130/143.
TrainSummary run_training(const TrainingPlan& plan, const TrainOptions& options = {});

std::string format_summary(const TrainSummary& summary);

}  // namespace sdtrain::train
