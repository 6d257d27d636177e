#pragma once
// What a run may do to its output_dir, and what it must never do to its inputs.
//
// * The base model, the photos and the class images are inputs: an output_dir that is one of
//   their folders, lies inside one, or would write over one is refused before anything is
//   written (check_output_dir_is_not_an_input, part of the plan, so --dry-run reports it too).
// * A folder that already holds a run is only continued (resume) or, with --overwrite, cleared;
//   "latest" with no checkpoint to continue from never starts afresh over an earlier run.
// * logs/metrics.jsonl holds one JSON record per line; after a kill the last line may be torn.
//   A resumed run keeps the records up to the step it resumes from and rewrites the file
//   (atomically), so nothing is logged twice and no line is torn.

#include <filesystem>
#include <string>
#include <vector>

#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

// Throws ConfigError (exit 1) when output_dir is, contains the written parts of, or lies inside
// the model folder, the instance folder or the class folder. `base_components` are the
// subfolders of the model folder (unet, vae, ...) that an export writes into output_dir.
void check_output_dir_is_not_an_input(const TrainConfig& config,
                                      const std::vector<std::string>& base_components);

// A LoRA run's adapters in the diffusers layout (also each checkpoint's adapter file), and in
// the kohya layout of lora_formats "kohya" (models/lora_file.h).
inline constexpr const char* kLoRAWeightsFile = "pytorch_lora_weights.safetensors";
inline constexpr const char* kLoRAKohyaFile = "lora_kohya.safetensors";
// A full run's model as one file in the original LDM layout (save_format "single_file", "both").
inline constexpr const char* kSingleFileName = "model.safetensors";
// Its LDM config beside it, for a v-prediction model (AUTOMATIC1111's sidecar rule).
inline constexpr const char* kSingleFileSidecar = "model.yaml";

// output_dir/logs/metrics.jsonl: one JSON record per optimizer step.
inline std::filesystem::path metrics_file(const std::filesystem::path& output_dir) {
  return output_dir / "logs" / "metrics.jsonl";
}

// True when output_dir holds a run: a checkpoint, a published model or a logged step.
bool output_dir_holds_a_run(const std::filesystem::path& output_dir);

// Makes output_dir ready for this run (the caller holds its OutputLock): refuses an earlier
// run unless resuming or overwriting, clears it with overwrite. Throws ConfigError/OutputError.
void prepare_output_dir(const TrainConfig& config, bool overwrite);

// The records of a JSON-lines file: every complete line that parses; a torn or damaged line
// is skipped with a warning naming the file and line.
std::vector<std::string> read_json_lines(const std::filesystem::path& path);

// Rewrites metrics.jsonl (atomically) with only the records of steps <= last_step.
void keep_metrics_up_to(const std::filesystem::path& metrics, int64_t last_step);

}  // namespace sdtrain::train
