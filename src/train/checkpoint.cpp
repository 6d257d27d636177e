#include "sdtrain/train/checkpoint.h"

#include <algorithm>
#include <regex>
#include <system_error>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "sdtrain/util/staged_folder.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

constexpr const char* kStateFile = "trainer_state.json";
constexpr const char* kRandomStatesFile = "random_states.safetensors";

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
  json["config"] = state.config;
  return json;
}

}  // namespace

fs::path save_checkpoint(const fs::path& output_dir, const TrainerState& state,
                         const std::function<void(const fs::path&)>& write_models) {
  const fs::path target = output_dir / ("checkpoint-" + std::to_string(state.global_step));
  StagedFolder staged(target);
  write_models(staged.path());
  io::save_safetensors(staged.path() / kRandomStatesFile, {{"cpu_generator", state.rng_state.contiguous()}});
  write_file_atomically(staged.path() / kStateFile, state_to_json(state).dump(2) + "\n");
  staged.publish();
  return target;
}

TrainerState read_trainer_state(const fs::path& checkpoint_dir) {
  const fs::path path = checkpoint_dir / kStateFile;
  const nlohmann::json json = read_json_file(path, ExitCode::usage);
  TrainerState state;
  try {
    state.global_step = json.at("global_step").get<int64_t>();
    state.epoch = json.at("epoch").get<int64_t>();
    state.batch_in_epoch = json.at("batch_in_epoch").get<int64_t>();
    state.loss_scale = json.at("loss_scale").get<double>();
    state.loss_scale_growth_tracker = json.at("loss_scale_growth_tracker").get<int64_t>();
    state.last_loss = json.value("last_loss", 0.0);
    state.config = json.at("config");
  } catch (const nlohmann::json::exception& error) {
    throw ConfigError(path.string() + " is not a valid trainer state (" + error.what() + ")");
  }
  io::SafetensorsFile random_states(checkpoint_dir / kRandomStatesFile);
  state.rng_state = random_states.tensor("cpu_generator").clone();
  return state;
}

std::vector<fs::path> list_checkpoints(const fs::path& output_dir) {
  std::vector<std::pair<int64_t, fs::path>> found;
  std::error_code error;
  if (!fs::is_directory(output_dir, error)) return {};
  for (const auto& entry : fs::directory_iterator(output_dir)) {
    auto step = checkpoint_step(entry.path());
    if (step && entry.is_directory() && fs::exists(entry.path() / kStateFile)) found.emplace_back(*step, entry.path());
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
    if (error) throw OutputError("cannot remove old checkpoint " + checkpoints[i].string() + ": " + error.message());
  }
}

std::optional<fs::path> resolve_checkpoint(const fs::path& output_dir, const std::string& spec) {
  if (spec == "latest") {
    std::vector<fs::path> checkpoints = list_checkpoints(output_dir);
    if (checkpoints.empty()) return std::nullopt;
    return checkpoints.back();
  }
  fs::path path = spec;
  if (path.is_relative() && !fs::exists(path)) path = output_dir / spec;
  if (!fs::is_directory(path) || !fs::exists(path / kStateFile)) {
    std::string known;
    for (const auto& checkpoint : list_checkpoints(output_dir)) known += " " + checkpoint.filename().string();
    throw ConfigError("resume_from_checkpoint: \"" + spec + "\" is not a checkpoint folder (looked for " +
                      (path / kStateFile).string() + ")" +
                      (known.empty() ? std::string(" and ") + output_dir.string() + " has no checkpoints"
                                     : "; checkpoints in " + output_dir.string() + ":" + known));
  }
  return path;
}

}  // namespace sdtrain::train
