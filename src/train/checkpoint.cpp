#include "sdtrain/train/checkpoint.h"

#include <algorithm>
#include <cmath>
#include <regex>
#include <system_error>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/file_manifest.h"
#include "sdtrain/util/json.h"
#include "sdtrain/util/kill_point.h"
#include "sdtrain/util/log.h"
#include "sdtrain/util/staged_folder.h"
#include "sdtrain/util/text.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kDamagedCheckpointFix =
    " (the checkpoint was damaged or edited by hand; resume from another checkpoint, or start "
    "again with "
    "--overwrite)";

std::optional<int64_t> checkpoint_step(const fs::path& dir) {
  static const std::regex pattern("checkpoint-([0-9]+)");
  std::smatch match;
  const std::string name = dir.filename().string();
  if (!std::regex_match(name, match, pattern)) return std::nullopt;
  return std::stoll(match[1]);
}

nlohmann::ordered_json state_to_json(const TrainerState& state) {
  nlohmann::ordered_json json;
  json["global_step"] = state.global_step;
  json["epoch"] = state.epoch;
  json["batch_in_epoch"] = state.batch_in_epoch;
  json["loss_scale"] = state.loss_scale;
  json["loss_scale_growth_tracker"] = state.loss_scale_growth_tracker;
  json["last_loss"] = state.last_loss;
  if (state.dataset.instance_images >= 0) {
    json["dataset"] = {{"instance_images", state.dataset.instance_images},
                       {"class_images", state.dataset.class_images},
                       {"batches_per_epoch", state.dataset.batches_per_epoch}};
    if (state.dataset.samples_per_batch > 0)
      json["dataset"]["samples_per_batch"] = state.dataset.samples_per_batch;
  }
  json["config"] = state.config;
  return json;
}

// A field of trainer_state.json, range-checked: a hand-edited or damaged value is refused here
// instead of training a wrong number of steps or reading past the end of an epoch.
int64_t integer_field(const nlohmann::json& json, const char* key, int64_t minimum,
                      const fs::path& path) {
  const nlohmann::json& value = json.at(key);
  if (!value.is_number_integer() || value.get<int64_t>() < minimum) {
    throw ModelError(path.string() + ": \"" + key + "\" must be an integer of at least " +
                     std::to_string(minimum) + ", found " + printable(value.dump()) +
                     kDamagedCheckpointFix);
  }
  return value.get<int64_t>();
}

void parse_state_fields(const nlohmann::json& json, const fs::path& path, TrainerState& state) {
  state.global_step = integer_field(json, "global_step", 0, path);
  state.epoch = integer_field(json, "epoch", 0, path);
  state.batch_in_epoch = integer_field(json, "batch_in_epoch", 0, path);
  state.loss_scale = json.at("loss_scale").get<double>();
  if (!std::isfinite(state.loss_scale) || state.loss_scale <= 0) {
    throw ModelError(path.string() + ": \"loss_scale\" must be a finite number above 0, found " +
                     json.at("loss_scale").dump() + kDamagedCheckpointFix);
  }
  state.loss_scale_growth_tracker = integer_field(json, "loss_scale_growth_tracker", 0, path);
  // JSON has no NaN: a non-finite last loss (an fp16 step skipped) is written as null.
  const nlohmann::json& loss = json.value("last_loss", nlohmann::json(0.0));
  state.last_loss = loss.is_number() ? loss.get<double>() : std::nan("");
  if (json.contains("dataset")) {  // absent in checkpoints of sdtrain 0.1
    const nlohmann::json& dataset = json.at("dataset");
    state.dataset.instance_images = integer_field(dataset, "instance_images", 1, path);
    state.dataset.class_images = integer_field(dataset, "class_images", 0, path);
    state.dataset.batches_per_epoch = integer_field(dataset, "batches_per_epoch", 1, path);
    if (dataset.contains("samples_per_batch"))
      state.dataset.samples_per_batch = integer_field(dataset, "samples_per_batch", 1, path);
  }
  if (!json.at("config").is_object()) {
    throw ModelError(path.string() + ": \"config\" must be the run's configuration object, found " +
                     printable(json.at("config").dump()) + kDamagedCheckpointFix);
  }
  state.config = json.at("config");
}

}  // namespace

fs::path write_checkpoint_folder(const fs::path& output_dir, const TrainerState& state,
                                 const std::function<void(const fs::path&)>& write_models) {
  const fs::path target = output_dir / ("checkpoint-" + std::to_string(state.global_step));
  StagedFolder staged(target);
  write_models(staged.path());
  io::save_safetensors(staged.path() / kCheckpointRandomStatesFile,
                       {{"cpu_generator", state.rng_state.contiguous()}});
  write_file_atomically(staged.path() / kStateFile, state_to_json(state).dump(2) + "\n");
  kill_point("checkpoint-files");
  write_manifest(staged.path());  // last: a checkpoint without a valid manifest is not whole
  staged.publish();
  kill_point("checkpoint-published");
  return target;
}

TrainerState read_trainer_state(const fs::path& checkpoint_dir) {
  const fs::path path = checkpoint_dir / kStateFile;
  const nlohmann::json json = read_json_file(path, ExitCode::model);
  TrainerState state;
  try {
    if (!json.is_object())
      throw ModelError(path.string() + " is not a JSON object" + kDamagedCheckpointFix);
    parse_state_fields(json, path, state);
  } catch (const nlohmann::json::exception& error) {
    throw ModelError(path.string() + " is not a valid trainer state (" + printable(error.what()) +
                     ")" + kDamagedCheckpointFix);
  }
  if (const auto step = checkpoint_step(checkpoint_dir); step && *step != state.global_step) {
    throw ModelError(path.string() + ": \"global_step\" is " + std::to_string(state.global_step) +
                     " in a folder named " + checkpoint_dir.filename().string() +
                     kDamagedCheckpointFix);
  }
  io::SafetensorsFile random_states(checkpoint_dir / kCheckpointRandomStatesFile);
  state.rng_state = random_states.tensor("cpu_generator").clone();
  return state;
}

std::vector<fs::path> list_checkpoints(const fs::path& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code error;
  if (!fs::is_directory(output_dir, error)) return {};
  for (const auto& entry : fs::directory_iterator(output_dir)) {
    auto step = checkpoint_step(entry.path());
    if (step && entry.is_directory() && fs::exists(entry.path() / kStateFile))
      found.emplace_back(*step, entry.path());
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> paths;
  for (auto& [step, path] : found) paths.push_back(path);
  return paths;
}

void prune_checkpoints(const fs::path& output_dir, int keep) {
  std::vector<fs::path> checkpoints = list_checkpoints(output_dir);
  for (size_t i = 0; i + keep < checkpoints.size(); ++i) {
    std::error_code error;
    fs::remove_all(checkpoints[i], error);
    if (error)
      throw OutputError("cannot remove old checkpoint " + checkpoints[i].string() + ": " +
                        error.message());
  }
}

std::optional<fs::path> resolve_checkpoint(const fs::path& output_dir, const std::string& spec) {
  if (spec == "latest") {
    std::vector<fs::path> checkpoints = list_checkpoints(output_dir);
    std::string problems;
    // The newest checkpoint that proves it is whole; a damaged newer one is reported and passed
    // over.
    for (auto it = checkpoints.rbegin(); it != checkpoints.rend(); ++it) {
      const auto problem = verify_manifest(*it);
      if (!problem) return *it;
      log::warn("not resuming from " + it->string() + ": " + *problem);
      problems += "\n  " + *problem;
    }
    if (checkpoints.empty()) return std::nullopt;
    throw ModelError("resume_from_checkpoint \"latest\": no checkpoint in " + output_dir.string() +
                     " is whole:" + problems +
                     "\nstart again with --overwrite, or choose another output_dir");
  }
  fs::path path = spec;
  if (path.is_relative() && !fs::exists(path)) path = output_dir / spec;
  if (!fs::is_directory(path) || !fs::exists(path / kStateFile)) {
    std::string known;
    for (const auto& checkpoint : list_checkpoints(output_dir))
      known += " " + checkpoint.filename().string();
    throw ConfigError(
        "resume_from_checkpoint: \"" + spec + "\" is not a checkpoint folder (looked for " +
        (path / kStateFile).string() + ")" +
        (known.empty() ? std::string(" and ") + output_dir.string() + " has no checkpoints"
                       : "; checkpoints in " + output_dir.string() + ":" + known));
  }
  if (const auto problem = verify_manifest(path)) {
    throw ModelError("cannot resume from " + path.string() + ": " + *problem +
                     "; resume from another checkpoint (\"latest\" picks the newest whole one)");
  }
  return path;
}

}  // namespace sdtrain::train
