#include "sdtrain/train/output_dir.h"

#include <algorithm>
#include <fstream>
#include <nlohmann/json.hpp>
#include <system_error>

#include "sdtrain/train/checkpoint.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::train {
namespace {

fs::path resolved(const std::string& path) {
  std::error_code ignored;
  return fs::weakly_canonical(fs::absolute(path), ignored).lexically_normal();
}

// True when `inner` is `outer` or lies inside it (both resolved).
bool is_within(const fs::path& inner, const fs::path& outer) {
  auto [outer_end, inner_it] =
      std::mismatch(outer.begin(), outer.end(), inner.begin(), inner.end());
  return outer_end == outer.end() || (std::next(outer_end) == outer.end() && outer_end->empty());
}

// The first component of `inner` below `outer` (inner must lie inside outer).
std::string first_component_below(const fs::path& inner, const fs::path& outer) {
  const fs::path relative = inner.lexically_relative(outer);
  return relative.empty() || relative == "." ? "" : relative.begin()->string();
}

bool written_by_a_run(const std::string& name, const std::vector<std::string>& base_components) {
  if (name.empty() || name == "logs" || name == "samples" || name == "model_index.json" ||
      name == kLoRAWeightsFile || name == kLoRAKohyaFile || name == kSingleFileName ||
      name == kSingleFileSidecar)
    return true;
  if (name.starts_with("checkpoint-")) return true;
  return std::find(base_components.begin(), base_components.end(), name) != base_components.end();
}

// A published (or half-published) model: what a fresh start would write over.
bool holds_model_files(const fs::path& output_dir) {
  std::error_code ignored;
  for (const char* name : {"model_index.json", "unet", "text_encoder", "vae", kLoRAWeightsFile,
                           kLoRAKohyaFile, kSingleFileName}) {
    if (fs::exists(output_dir / name, ignored)) return true;
  }
  return false;
}

}  // namespace

void check_output_dir_is_not_an_input(const TrainConfig& config,
                                      const std::vector<std::string>& base_components) {
  const fs::path output = resolved(config.outputs.output_dir);
  struct Input {
    const char* key;
    std::string path;
  };
  for (const Input& input :
       {Input{"pretrained_model_name_or_path", config.pretrained_model_name_or_path},
        Input{"instance_data_dir", config.data.instance_data_dir},
        Input{"class_data_dir", config.class_images.class_data_dir}}) {
    if (input.path.empty()) continue;
    const fs::path folder = resolved(input.path);
    // The class folder may live inside output_dir (its default is output_dir/class_images):
    // class images are inputs the run itself adds to, never overwrites.
    const bool class_folder = std::string(input.key) == "class_data_dir";
    const bool output_inside_input =
        is_within(output, folder) && (!class_folder || output == folder);
    const bool input_in_written_part =
        is_within(folder, output) &&
        written_by_a_run(first_component_below(folder, output), base_components);
    if (output_inside_input || input_in_written_part) {
      throw ConfigError(
          "\"output_dir\" " + config.outputs.output_dir + " would write into \"" + input.key +
          "\" " + input.path +
          ": a run writes unet/, text_encoder/, checkpoint-N/ and logs/ there and would overwrite "
          "its input. Choose an output_dir outside " +
          input.path);
    }
  }
}

bool output_dir_holds_a_run(const fs::path& output_dir) {
  std::error_code ignored;
  const fs::path metrics = metrics_file(output_dir);
  return !list_checkpoints(output_dir).empty() || holds_model_files(output_dir) ||
         (fs::is_regular_file(metrics, ignored) && fs::file_size(metrics, ignored) > 0);
}

void prepare_output_dir(const TrainConfig& config, bool overwrite) {
  const fs::path output_dir = config.outputs.output_dir;
  std::error_code error;
  fs::create_directories(output_dir / "logs", error);
  if (error) {
    throw OutputError("cannot create output_dir " + output_dir.string() + ": " + error.message() +
                      " (choose a writable output_dir)");
  }
  // A run has trained once it logged a step; train_config.json alone (a run stopped while
  // generating class images) is set-up that the same command may simply redo.
  if (!output_dir_holds_a_run(output_dir)) return;
  const bool has_checkpoint = !list_checkpoints(output_dir).empty();
  if (!config.outputs.resume_from_checkpoint.empty() && !overwrite) {
    if (has_checkpoint || config.outputs.resume_from_checkpoint != "latest")
      return;  // resume() takes over
    if (!holds_model_files(output_dir)) {
      // Steps were logged but never saved (killed before the first checkpoint): starting
      // afresh loses nothing, and is what the same command must do after such a kill.
      log::warn("output_dir " + output_dir.string() +
                " has logged steps but no checkpoint; starting afresh");
      return;
    }
    throw ConfigError(
        "output_dir " + output_dir.string() +
        " holds a model but no checkpoint to resume from; "
        "\"resume_from_checkpoint\": \"latest\" will not start afresh over it. Choose another "
        "output_dir, or pass --overwrite to replace it");
  }
  if (!overwrite) {
    throw ConfigError(
        "output_dir " + output_dir.string() + " already holds a training run; " +
        (has_checkpoint ? "set \"resume_from_checkpoint\": \"latest\" to continue it, " : "") +
        "choose another output_dir, or pass --overwrite to start again (removes its checkpoints)");
  }
  for (const auto& checkpoint : list_checkpoints(output_dir)) {
    log::info("--overwrite: removing " + checkpoint.string());
    fs::remove_all(checkpoint, error);
    if (error)
      throw OutputError("--overwrite: cannot remove " + checkpoint.string() + ": " +
                        error.message());
  }
  for (const fs::path& file :
       {metrics_file(output_dir), output_dir / "model_index.json", output_dir / kLoRAWeightsFile,
        output_dir / kLoRAKohyaFile, output_dir / kSingleFileName,
        output_dir / kSingleFileSidecar}) {
    fs::remove(file, error);
    if (error)
      throw OutputError("--overwrite: cannot remove " + file.string() + ": " + error.message());
  }
}

std::vector<std::string> read_json_lines(const fs::path& path) {
  std::vector<std::string> records;
  std::ifstream in(path, std::ios::binary);
  std::string line;
  for (int64_t number = 1; std::getline(in, line); ++number) {
    const bool complete = !in.eof();  // the last line of a killed writer has no newline
    if (complete && nlohmann::json::accept(line)) {
      records.push_back(line);
    } else if (!line.empty()) {
      log::warn(path.string() + ": skipping line " + std::to_string(number) +
                (complete ? " (not valid JSON)" : " (torn: the writer was stopped mid-line)"));
    }
  }
  return records;
}

void keep_metrics_up_to(const fs::path& metrics, int64_t last_step) {
  std::error_code ignored;
  if (!fs::is_regular_file(metrics, ignored)) return;  // absent, or not ours to rewrite (a device)
  std::string kept;
  for (const auto& record : read_json_lines(metrics)) {
    const nlohmann::json parsed = nlohmann::json::parse(record);
    if (parsed.is_object() && parsed.value("step", int64_t{0}) <= last_step) kept += record + "\n";
  }
  write_file_atomically(metrics, kept);
}

}  // namespace sdtrain::train
