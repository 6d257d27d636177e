#pragma once
// Resumable checkpoints: output_dir/checkpoint-N/ holds everything a run needs to continue
// exactly where it stopped, and its unet/ (and text_encoder/ when trained) are diffusers
// component folders that from_pretrained loads, so a checkpoint is also a usable model.
//
//   checkpoint-N/unet/                  config.json + diffusion_pytorch_model.safetensors (fp32)
//   checkpoint-N/text_encoder/          config.json + model.safetensors (when trained)
//   checkpoint-N/unet_ema/              the EMA weights, same layout (when use_ema)
//   checkpoint-N/optimizer.safetensors  optimizer state (AdamW moments or 8-bit states + absmax)
//   checkpoint-N/trainer_state.json     step, epoch, position in the epoch, loss scale, config
//   checkpoint-N/random_states.safetensors  the training generator's state
//   checkpoint-N/manifest.json          size and XXH3-128 of every other file, written last
//
// A checkpoint is assembled as .checkpoint-N.partial.PID and renamed when complete, so a crash
// or a full disk while saving leaves the previous checkpoints as they were; resume trusts only
// a checkpoint whose manifest matches every file (util/file_manifest.h).

#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace sdtrain::train {

// File names inside checkpoint-N/ besides the trained components' folders.
inline constexpr const char* kCheckpointOptimizerFile = "optimizer.safetensors";
inline constexpr const char* kCheckpointEmaDir = "unet_ema";
inline constexpr const char* kCheckpointRandomStatesFile = "random_states.safetensors";

struct TrainerState {
  int64_t global_step = 0;     // optimizer steps taken
  int64_t epoch = 0;           // epoch in progress
  int64_t batch_in_epoch = 0;  // micro-batches of that epoch already consumed
  double loss_scale = 1.0;
  int64_t loss_scale_growth_tracker = 0;
  double last_loss = 0.0;
  // The data the position above counts in, so a resume notices photos added or removed
  // (-1: not recorded, a checkpoint of sdtrain 0.1).
  struct Dataset {
    int64_t instance_images = -1;
    int64_t class_images = -1;
    int64_t batches_per_epoch = -1;
    // The global batch (train_batch_size x processes); -1: not recorded (before data parallel).
    int64_t samples_per_batch = -1;
  } dataset;
  torch::Tensor rng_state;        // CPU generator state (uint8)
  nlohmann::ordered_json config;  // the run's resolved TrainConfig
};

// Writes checkpoint-<state.global_step> in output_dir: `write_models(dir)` fills in the model
// folders and optimizer file, then the trainer state is added and the folder published.
std::filesystem::path write_checkpoint_folder(
    const std::filesystem::path& output_dir, const TrainerState& state,
    const std::function<void(const std::filesystem::path&)>& write_models);

// Reads and range-checks checkpoint_dir/trainer_state.json; a damaged or edited field is a
// ModelError (exit 3) naming the file.
TrainerState read_trainer_state(const std::filesystem::path& checkpoint_dir);

// checkpoint-N folders in output_dir, oldest (lowest N) first. Partial ones are not listed.
std::vector<std::filesystem::path> list_checkpoints(const std::filesystem::path& output_dir);

// Removes the oldest checkpoints so that at most `keep` remain.
void prune_checkpoints(const std::filesystem::path& output_dir, int keep);

// resume_from_checkpoint: "latest" (the newest checkpoint in output_dir whose manifest
// verifies, or nullopt when there is none at all), "checkpoint-N" (inside output_dir) or a path
// to a checkpoint folder. Throws ConfigError when a named checkpoint does not exist, ModelError
// when the one named (or, for "latest", every one) fails its manifest.
std::optional<std::filesystem::path> resolve_checkpoint(const std::filesystem::path& output_dir,
                                                        const std::string& spec);

// Throws ConfigError listing every setting that differs between the run that wrote
// `checkpoint` and `current` (the resolved configuration now), except those a resume may change:
// how long to train and what to write on the way. The rest changes the math.
void check_resumable_settings(const TrainerState& saved, const nlohmann::ordered_json& current,
                              const std::filesystem::path& checkpoint);

// The saved position counts micro-batches of the data as it was; photos added or removed since
// make it point elsewhere, or past the end of the epoch. Unchanged data: nothing happens.
// Changed: InputDataError, or with `reset_epoch` a warning and `saved` moved to the start of
// the next epoch (same step count).
void check_saved_position(TrainerState& saved, const TrainerState::Dataset& now, bool reset_epoch,
                          const std::filesystem::path& checkpoint);

}  // namespace sdtrain::train
