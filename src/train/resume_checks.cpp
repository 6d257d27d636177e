// What a resume checks before it trusts a checkpoint's position (checkpoint.h).
#include <algorithm>
#include <string>
#include <vector>

#include "sdtrain/train/checkpoint.h"
#include "sdtrain/train/train_config.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

const std::vector<std::string>& resumable_differences() {
  static const std::vector<std::string> keys = {
      "epochs", "max_steps", "checkpointing_steps", "checkpoints_total_limit",
      "resume_from_checkpoint", "resume_reset_epoch", "validation_prompts", "validation_steps",
      "num_validation_images", "save_dtype", "save_format", "lora_formats", "output_dir", "device",
      "sample_batch_size", "num_class_images", "prior_generation_precision",
      "prior_generation_scheduler", "prior_generation_steps", "prior_generation_guidance_scale",
      // How memory is saved, not what is computed: the
      // optimizer state is the same either way, and the
      // settings a budget chose are compared themselves.
      "fused_backward_pass", "memory_budget",
      // The same kernels, launched from a graph.
      "cuda_graphs",
      // The same function from other kernels: only
      // the rounding differs.
      "fused_group_norm_silu", "attention_backend"};
  return keys;
}

// The value a setting had in a run whose checkpoint does not record it: the setting is newer
// than the checkpoint, and new settings default to the behaviour before them (channels_last
// false: that run's optimizer states follow the NCHW storage order).
const nlohmann::ordered_json* value_before_the_key_existed(const std::string& key) {
  static const nlohmann::ordered_json defaults = TrainConfig{}.to_json();
  return defaults.contains(key) ? &defaults[key] : nullptr;
}

bool may_differ(const std::string& key) {
  const auto& keys = resumable_differences();
  return std::find(keys.begin(), keys.end(), key) != keys.end();
}

}  // namespace

void check_resumable_settings(const TrainerState& saved, const nlohmann::ordered_json& current,
                              const fs::path& checkpoint) {
  std::string differences;
  for (const auto& [key, value] : current.items()) {
    if (may_differ(key)) continue;
    const bool recorded = saved.config.contains(key);
    const nlohmann::ordered_json* before =
        recorded ? &saved.config[key] : value_before_the_key_existed(key);
    if (before && *before != value)
      differences += "\n  " + key + ": checkpoint " + before->dump() +
                     (recorded ? "" : " (not recorded: the default)") + ", now " + value.dump();
  }
  if (differences.empty()) return;
  throw ConfigError("cannot resume from " + checkpoint.string() +
                    ": these settings differ from the run that wrote it:" + differences +
                    "\nrestore them, or start a new run in another output_dir");
}

namespace {

// The same images in global batches of another size (data parallel with another number of
// processes): the position is the samples consumed, found again at a batch boundary when the
// new size divides them; else the run goes on at the next epoch.
bool moved_to_new_batch_size(TrainerState& saved, const TrainerState::Dataset& now) {
  // Not recorded: a checkpoint of one process, whose global batch was its train_batch_size.
  const int64_t before = saved.dataset.samples_per_batch > 0
                             ? saved.dataset.samples_per_batch
                             : saved.config.value("train_batch_size", int64_t{-1});
  if (before <= 0 || now.samples_per_batch <= 0 || before == now.samples_per_batch ||
      saved.dataset.instance_images != now.instance_images ||
      saved.dataset.class_images != now.class_images)
    return false;
  const int64_t consumed = saved.batch_in_epoch * before;
  if (consumed % now.samples_per_batch == 0) {
    saved.batch_in_epoch = consumed / now.samples_per_batch;
  } else {
    saved.epoch += 1;
    saved.batch_in_epoch = 0;
  }
  log::info(log::str("resuming with global batches of ", now.samples_per_batch, " samples (",
                     before, " when the checkpoint was written): continuing at micro-batch ",
                     saved.batch_in_epoch, " of epoch ", saved.epoch));
  return true;
}

}  // namespace

void check_saved_position(TrainerState& saved, const TrainerState::Dataset& now, bool reset_epoch,
                          const fs::path& checkpoint) {
  if (moved_to_new_batch_size(saved, now)) return;
  const bool recorded = saved.dataset.instance_images >= 0;
  const bool changed = recorded ? saved.dataset.instance_images != now.instance_images ||
                                      saved.dataset.class_images != now.class_images ||
                                      saved.dataset.batches_per_epoch != now.batches_per_epoch
                                : saved.batch_in_epoch > now.batches_per_epoch;
  if (!changed) return;
  const std::string what =
      recorded
          ? log::str(saved.dataset.instance_images, " photos and ", saved.dataset.class_images,
                     " class images then, ", now.instance_images, " and ", now.class_images, " now")
          : log::str("it stopped at micro-batch ", saved.batch_in_epoch,
                     " of an epoch that now has ", now.batches_per_epoch);
  if (!reset_epoch) {
    throw InputDataError("cannot resume from " + checkpoint.string() +
                         ": the training images changed since it was written (" + what +
                         "). Restore them, or set \"resume_reset_epoch\": true (--set "
                         "resume_reset_epoch=true) to continue at the start of the next epoch with "
                         "the same step count");
  }
  log::warn("resume_reset_epoch: the training images changed (" + what +
            "); continuing at the start of epoch " +
            std::to_string(saved.epoch + (saved.batch_in_epoch > 0 ? 1 : 0)));
  if (saved.batch_in_epoch > 0) saved.epoch += 1;
  saved.batch_in_epoch = 0;
}

}  // namespace sdtrain::train
