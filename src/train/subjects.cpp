#include "sdtrain/train/subjects.h"

#include <c10/util/Exception.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include "sdtrain/models/base_model.h"
#include "sdtrain/train/output_dir.h"
#include "sdtrain/train/plan.h"
#include "sdtrain/train/trainer.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace sdtrain::train {

namespace {

constexpr const char* kIndexVariables[] = {"SLURM_ARRAY_TASK_ID", "AWS_BATCH_JOB_ARRAY_INDEX",
                                           "JOB_COMPLETION_INDEX"};

int64_t parse_index(const std::string& text, const std::string& source, int64_t count) {
  std::size_t used = 0;
  int64_t index = -1;
  try {
    index = std::stoll(text, &used);
  } catch (const std::exception&) {
    used = 0;
  }
  if (used != text.size() || text.empty() || index < 0 || index >= count)
    throw ConfigError(source + "=" + text + ": not a subject index; the manifest holds " +
                      std::to_string(count) + " subjects, numbered 0 to " +
                      std::to_string(count - 1) + " (blank lines are not counted)");
  return index;
}

std::string slug(const std::string& text) {
  std::string out;
  for (const unsigned char c : text) {
    const bool keep = std::isalnum(c) != 0;
    if (keep)
      out += static_cast<char>(std::tolower(c));
    else if (!out.empty() && out.back() != '-')
      out += '-';
    if (out.size() >= 40) break;
  }
  while (!out.empty() && out.back() == '-') out.pop_back();
  return out.empty() ? "class" : out;
}

// FNV-1a, 64 bits: a stable name across builds and machines (std::hash is neither).
uint64_t fnv1a(const std::string& text) {
  uint64_t hash = 0xcbf29ce484222325ULL;
  for (const unsigned char c : text) hash = (hash ^ c) * 0x100000001b3ULL;
  return hash;
}

}  // namespace

std::vector<SubjectLine> read_subjects_manifest(const fs::path& manifest) {
  std::ifstream in(manifest, std::ios::binary);
  if (!in)
    throw ConfigError(manifest.string() +
                      ": cannot read the subjects manifest (a file of JSON "
                      "lines, one subject per line; docs/scaling.md)");
  std::vector<SubjectLine> subjects;
  std::string text;
  for (int64_t number = 1; std::getline(in, text); ++number) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    SubjectLine subject;
    subject.index = static_cast<int64_t>(subjects.size());
    subject.line_number = number;
    subject.values = json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (subject.values.is_discarded() || !subject.values.is_object()) {
      subject.parse_error = "not a JSON object";
      subject.values = json();
    }
    subjects.push_back(std::move(subject));
  }
  if (subjects.empty())
    throw ConfigError(manifest.string() +
                      ": no subjects; write one JSON object per line, e.g. "
                      "{\"instance_data_dir\": \"photos/anna\", \"output_dir\": "
                      "\"out/anna\"}");
  return subjects;
}

SubjectSelection select_subject(const std::string& flag, int64_t subject_count,
                                const EnvironmentLookup& environment) {
  if (flag == "all") return {std::nullopt, "--subject-index all"};
  if (!flag.empty())
    return {parse_index(flag, "--subject-index", subject_count), "--subject-index"};
  for (const char* name : kIndexVariables) {
    const char* value = environment(name);
    if (value && *value) return {parse_index(value, name, subject_count), name};
  }
  return {std::nullopt, ""};
}

std::string class_folder_name(const TrainConfig& config) {
  const auto& c = config.class_images;
  std::ostringstream key;
  key << config.pretrained_model_name_or_path << '\n'
      << config.variant << '\n'
      << c.class_prompt << '\n'
      << config.data.resolution << '\n'
      << c.prior_generation_scheduler << '\n'
      << c.prior_generation_steps << '\n'
      << c.prior_generation_guidance_scale << '\n'
      << c.prior_generation_precision << '\n'
      << config.seed;
  std::ostringstream name;
  name << slug(c.class_prompt) << '-' << std::hex << std::setw(8) << std::setfill('0')
       << (fnv1a(key.str()) & 0xffffffffULL);
  return name.str();
}

TrainConfig subject_config(const fs::path& config_file, const std::vector<std::string>& overrides,
                           const fs::path& manifest, const SubjectLine& subject,
                           const fs::path& work_dir) {
  const std::string source = manifest.string() + " line " + std::to_string(subject.line_number);
  if (!subject.parse_error.empty())
    throw ConfigError(source + ": " + subject.parse_error +
                      "; each line is one subject's keys, e.g. {\"instance_data_dir\": "
                      "\"photos/anna\", \"output_dir\": \"out/anna\"}");
  for (const char* key : {"instance_data_dir", "output_dir"}) {
    if (!subject.values.contains(key))
      throw ConfigError(source + ": \"" + key + "\" is missing; every subject names its own");
  }
  const ConfigLayer layer{subject.values, source, fs::absolute(manifest).parent_path()};
  TrainConfig config = load_train_config(config_file, overrides, &layer);
  if (config.outputs.resume_from_checkpoint.empty())
    config.outputs.resume_from_checkpoint = "latest";
  if (config.class_images.with_prior_preservation && config.class_images.class_data_dir.empty())
    config.class_images.class_data_dir =
        (fs::absolute(work_dir) / "class_images" / class_folder_name(config))
            .lexically_normal()
            .string();
  return config;
}

namespace {

// What happened to one subject, as subjects-summary.json records it.
struct SubjectResult {
  int64_t index = 0;
  int64_t line_number = 0;
  std::string output_dir;
  std::string status;  // "done", "failed", "interrupted", "skipped" (done in an earlier run)
  int exit_code = 0;
  int64_t steps = 0;
  int64_t steps_this_run = 0;
  double seconds = 0;
  std::optional<double> final_loss;
  std::string error;

  json to_json() const {
    json out = {{"index", index},
                {"line", line_number},
                {"output_dir", output_dir},
                {"status", status},
                {"exit_code", exit_code},
                {"steps", steps},
                {"steps_this_run", steps_this_run},
                {"seconds", seconds}};
    out["final_loss"] = final_loss ? json(*final_loss) : json(nullptr);
    if (!error.empty()) out["error"] = error;
    return out;
  }
};

// subjects-summary.json: rewritten (temp file + rename) after every subject, so a killed
// process leaves the outcomes of the subjects it finished. A rerun reads it to skip them.
class SubjectsSummary {
 public:
  SubjectsSummary(fs::path path, const SubjectsOptions& options, const std::string& selected_by)
      : path_(std::move(path)) {
    header_ = {
        {"manifest", fs::absolute(options.manifest).string()},
        {"config", options.config_file.empty() ? "" : fs::absolute(options.config_file).string()},
        {"selected_by", selected_by.empty() ? "every subject" : selected_by}};
    // Every summary beside this one: a subject finished by the whole manifest is known to an
    // array task, and the other way round.
    std::error_code ignored;
    for (const auto& entry : fs::directory_iterator(path_.parent_path(), ignored)) {
      const std::string name = entry.path().filename().string();
      if (entry.path() == path_ ||
          (name.starts_with("subjects-summary") && entry.path().extension() == ".json"))
        read_finished(entry.path());
    }
  }

  // The record of an earlier run that finished the subject writing `output_dir`, when the
  // model is still there.
  std::optional<json> finished_before(const std::string& output_dir) const {
    const auto it = done_before_.find(output_dir);
    if (it == done_before_.end() || !output_dir_holds_a_run(output_dir)) return std::nullopt;
    return it->second;
  }

  void record(const SubjectResult& result) {
    records_[result.index] = result.to_json();
    json out = header_;
    out["subjects"] = json::array();
    int64_t failed = 0;
    for (const auto& [index, record] : records_) {
      out["subjects"].push_back(record);
      failed += record["status"] == "failed" || record["status"] == "interrupted";
    }
    out["failed"] = failed;
    write_file_atomically(path_, out.dump(2) + "\n");
  }
  const fs::path& path() const { return path_; }

 private:
  void read_finished(const fs::path& summary) {
    std::error_code ignored;
    if (!fs::is_regular_file(summary, ignored)) return;
    const json previous = json::parse(read_file(summary, ExitCode::usage), nullptr, false);
    if (!previous.is_object() || !previous.contains("subjects")) return;
    for (const auto& record : previous["subjects"]) {
      const std::string status = record.is_object() ? record.value("status", "") : "";
      if (status == "done" || status == "skipped")
        done_before_[record.value("output_dir", "")] = record;
    }
  }

  fs::path path_;
  json header_;
  std::map<std::string, json> done_before_;
  std::map<int64_t, json> records_;
};

// One base opened and kept in host memory at a time: subjects that share it (the usual
// manifest) read its weights from disk once; a subject naming another base replaces it.
class SharedBase {
 public:
  const io::ModelFolder& for_config(const TrainConfig& config) {
    const std::string key = config.pretrained_model_name_or_path + "\n" +
                            config.single_file.single_file_config + "\n" +
                            config.single_file.single_file_prediction_type + "\n" +
                            (config.single_file.use_ema_weights ? "ema" : "");
    if (!folder_ || key != key_) {
      folder_.reset();  // the previous host copy goes before the next is read
      folder_.emplace(
          models::open_base_model(config.pretrained_model_name_or_path, config.single_file));
      folder_->keep_weights_in_host_memory();
      key_ = key;
    }
    return *folder_;
  }

 private:
  std::string key_;
  std::optional<io::ModelFolder> folder_;
};

// A subject's class_data_dir holds the images of one class: a second subject asking another
// class of the same folder would train on the first one's images.
class ClassFolders {
 public:
  void claim(const TrainConfig& config, int64_t line_number) {
    if (!config.class_images.with_prior_preservation) return;
    const std::string folder = config.class_images.class_data_dir;
    const std::string name = class_folder_name(config);
    const auto [it, inserted] = owners_.emplace(folder, std::pair{name, line_number});
    if (inserted || it->second.first == name) return;
    throw ConfigError("class_data_dir " + folder + " holds the class images of manifest line " +
                      std::to_string(it->second.second) + "; this subject's class (\"" +
                      config.class_images.class_prompt +
                      "\" and its generation settings) differs: give it its own class_data_dir, "
                      "or leave class_data_dir unset (one folder per class is then chosen)");
  }

 private:
  std::map<std::string, std::pair<std::string, int64_t>> owners_;
};

struct SubjectsRun {
  const SubjectsOptions& options;
  fs::path work_dir;
  SubjectsSummary& summary;
  SharedBase base;
  ClassFolders class_folders;
  std::map<std::string, int64_t> output_dirs;  // output_dir -> the line that writes it
};

int code_of(const std::exception_ptr& error, std::string& message) {
  try {
    std::rethrow_exception(error);
  } catch (const Error& e) {
    message = e.what();
    return static_cast<int>(e.code());
  } catch (const c10::OutOfMemoryError& e) {
    message = std::string("out of GPU memory: ") + e.what_without_backtrace();
    return static_cast<int>(ExitCode::out_of_memory);
  } catch (const c10::Error& e) {
    message = std::string("internal error: ") + e.what_without_backtrace();
  } catch (const std::exception& e) {
    message = std::string("internal error: ") + e.what();
  }
  return static_cast<int>(ExitCode::usage);
}

TrainConfig checked_subject_config(SubjectsRun& run, const SubjectLine& subject) {
  TrainConfig config = subject_config(run.options.config_file, run.options.overrides,
                                      run.options.manifest, subject, run.work_dir);
  const auto [it, inserted] =
      run.output_dirs.emplace(config.outputs.output_dir, subject.line_number);
  if (!inserted && it->second != subject.line_number)
    throw ConfigError("output_dir " + config.outputs.output_dir + " is also manifest line " +
                      std::to_string(it->second) + "'s: give each subject its own output_dir");
  run.class_folders.claim(config, subject.line_number);
  return config;
}

void train_subject(SubjectsRun& run, const TrainConfig& config, SubjectResult& result) {
  const TrainingPlan plan = plan_training(config);
  std::cout << train::format_plan(plan);
  for (const auto& warning : plan.warnings) log::warn(warning);
  for (const auto& note : plan.setting_notes) log::warn(note);
  if (run.options.dry_run) {
    result.status = "planned";
    return;
  }
  TrainOptions train_options;
  train_options.base = run.base.for_config(config);
  const TrainSummary summary = run_training(plan, train_options);
  log::info(format_summary(summary));
  result.status = "done";
  result.steps = summary.steps;
  result.steps_this_run = summary.steps_this_run;
  result.final_loss = summary.final_loss;
}

SubjectResult run_subject(SubjectsRun& run, const SubjectLine& subject, int64_t count) {
  const auto started = std::chrono::steady_clock::now();
  SubjectResult result;
  result.index = subject.index;
  result.line_number = subject.line_number;
  log::info(log::str("subject ", subject.index, " (", count, " in ", run.options.manifest.string(),
                     ", line ", subject.line_number, ")"));
  try {
    const TrainConfig config = checked_subject_config(run, subject);
    result.output_dir = config.outputs.output_dir;
    if (const auto before = run.summary.finished_before(result.output_dir);
        before && !run.options.dry_run) {
      log::info("subject " + std::to_string(subject.index) + ": already trained into " +
                result.output_dir + " (" + run.summary.path().string() + "); skipped");
      result.status = "skipped";
      result.steps = before->value("steps", int64_t{0});
      result.final_loss = before->value("final_loss", 0.0);
      return result;
    }
    train_subject(run, config, result);
  } catch (...) {
    result.exit_code = code_of(std::current_exception(), result.error);
    const bool interrupted = result.exit_code == static_cast<int>(ExitCode::interrupted_sigint) ||
                             result.exit_code == static_cast<int>(ExitCode::interrupted_sigterm);
    result.status = interrupted ? "interrupted" : "failed";
    log::error(log::str("subject ", subject.index, " (line ", subject.line_number, ") ",
                        result.status, " with exit code ", result.exit_code, ": ", result.error));
  }
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  return result;
}

fs::path summary_path(const SubjectsOptions& options, const SubjectSelection& selection) {
  if (!options.summary.empty()) return fs::absolute(options.summary);
  const fs::path folder = fs::absolute(options.manifest).parent_path();
  // One file per selected subject: array tasks running at once never write the same file.
  return folder / (selection.index
                       ? "subjects-summary-" + std::to_string(*selection.index) + ".json"
                       : std::string("subjects-summary.json"));
}

}  // namespace

int run_subjects(const SubjectsOptions& options) {
  const std::vector<SubjectLine> subjects = read_subjects_manifest(options.manifest);
  const EnvironmentLookup environment =
      options.environment ? options.environment : process_environment();
  const SubjectSelection selection =
      select_subject(options.subject_index, static_cast<int64_t>(subjects.size()), environment);
  if (selection.index)
    log::info(log::str("training subject ", *selection.index, " of ", subjects.size(), " (from ",
                       selection.source, ")"));
  SubjectsSummary summary(summary_path(options, selection), options, selection.source);
  SubjectsRun run{options, summary.path().parent_path(), summary, {}, {}, {}};
  int failures = 0, last_code = 0;
  for (const SubjectLine& subject : subjects) {
    // Every line is checked in order, so output_dir and class folder clashes are found the
    // same way whichever subject an array task trains.
    if (selection.index && subject.index != *selection.index) {
      try {
        checked_subject_config(run, subject);
      } catch (const Error&) {
      }
      continue;
    }
    const SubjectResult result = run_subject(run, subject, static_cast<int64_t>(subjects.size()));
    if (!options.dry_run) summary.record(result);
    if (result.status == "interrupted")
      throw Error(static_cast<ExitCode>(result.exit_code), result.error);
    if (result.exit_code != 0) ++failures, last_code = result.exit_code;
  }
  if (!options.dry_run) log::info("subjects summary: " + summary.path().string());
  if (failures == 0) return 0;
  if (selection.index) return last_code;
  log::error(log::str(failures, " of ", subjects.size(), " subjects failed; ",
                      summary.path().string(), " lists each with its exit code"));
  return static_cast<int>(ExitCode::subjects_failed);
}

}  // namespace sdtrain::train
