#pragma once
// Many subjects in one process, or one per array task (docs/scaling.md): a manifest of JSON
// lines, each one subject's keys over the shared configuration file. The base is read from disk
// once and each subject's models are built from the host copy; class images are generated once
// per distinct class (prompt and generation settings) and shared; each output_dir receives
// exactly what a single run writes; subjects-summary.json records every subject's outcome.

#include <cstdint>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/train/train_config.h"
#include "sdtrain/util/environment.h"

namespace sdtrain::train {

// One subject of the manifest: its keys (or why its line is not a JSON object).
struct SubjectLine {
  int64_t index = 0;        // 0-based among the manifest's subjects (blank lines skipped)
  int64_t line_number = 0;  // 1-based line in the file, for messages
  nlohmann::json values;    // the subject's keys, when the line parsed
  std::string parse_error;  // otherwise, what is wrong with it
};

// The non-blank lines of `manifest`. A line that is not a JSON object is kept with its
// parse_error: it fails that subject only. ConfigError when the file cannot be read or holds
// no subject.
std::vector<SubjectLine> read_subjects_manifest(const std::filesystem::path& manifest);

// Which subject an array task trains: `--subject-index` ("all": every subject, even inside an
// array job), else the first of SLURM_ARRAY_TASK_ID, AWS_BATCH_JOB_ARRAY_INDEX and
// JOB_COMPLETION_INDEX (Kubernetes Indexed Jobs) that is set; none: every subject.
struct SubjectSelection {
  std::optional<int64_t> index;
  std::string source;  // "--subject-index", the variable's name, or "" (every subject)
};
// ConfigError, naming where the index came from, when it is not an index of the
// `subject_count` subjects.
SubjectSelection select_subject(const std::string& flag, int64_t subject_count,
                                const EnvironmentLookup& environment);

// The configuration of one subject: `config_file`, the subject's keys (relative paths are
// relative to the manifest's folder), then `overrides`. instance_data_dir and output_dir must
// be the subject's own. Unless set, resume_from_checkpoint is "latest" (a rerun continues an
// interrupted subject) and class_data_dir is `work_dir`/class_images/<class> (shared by the
// subjects of one class). Throws ConfigError.
TrainConfig subject_config(const std::filesystem::path& config_file,
                           const std::vector<std::string>& overrides,
                           const std::filesystem::path& manifest, const SubjectLine& subject,
                           const std::filesystem::path& work_dir);

// The folder name of a class's shared images: a readable slug of the prompt and a hash of
// everything the images depend on (base, prompt, resolution, sampler, steps, guidance, seed,
// precision), so two classes never share a folder by accident.
std::string class_folder_name(const TrainConfig& config);

struct SubjectsOptions {
  std::filesystem::path config_file;
  std::vector<std::string> overrides;
  std::filesystem::path manifest;
  std::string subject_index;      // --subject-index: "", "all" or N
  std::filesystem::path summary;  // "" : beside the manifest (one per index in an array task)
  bool dry_run = false;
  EnvironmentLookup environment;  // getenv when empty
};

// Trains the selected subjects; returns the process's exit code: 0 when every subject
// succeeded; an array task's subject's own code; else ExitCode::subjects_failed. An interrupt
// (SIGINT/SIGTERM) records the subject as interrupted and throws its Error.
int run_subjects(const SubjectsOptions& options);

}  // namespace sdtrain::train
