// Many subjects (docs/scaling.md): a manifest of three tiny subjects, one with no photos, runs
// through the executable: two complete models, one failure with its exit code in the summary,
// the base read from disk once, the class images generated once for the shared class, the
// second trained subject equal byte for byte to a single run of it (the weights were reset
// between subjects), and a rerun that skips the finished subjects. Selecting one subject:
// --subject-index and each array-job variable.
#include "sdtrain/train/subjects.h"

#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "test_support.h"
#include "train_support.h"

namespace fs = std::filesystem;
using json = nlohmann::json;
using namespace sdtrain::testing;

namespace {

CommandResult sdtrain_in(const fs::path& dir, const std::string& args,
                         const std::string& environment = "") {
  CommandResult result;
  result.code = run_command(
      "cd " + dir.string() + " && " + environment + " timeout 600 " + sdtrain_exe() + " " + args,
      &result.output);
  return result;
}

int count_of(const std::string& text, const std::string& needle) {
  int count = 0;
  for (auto at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1))
    ++count;
  return count;
}

// base.json (shared keys, prior preservation with class images to generate) and
// subjects.jsonl: anna and carl train; bert has no photos.
void write_subjects(const fs::path& dir) {
  fs::create_directories(dir / "photos" / "empty");
  const json base = {{"pretrained_model_name_or_path", (demo() / "model").string()},
                     {"instance_prompt", "a photo of sks robot"},
                     {"with_prior_preservation", true},
                     {"class_prompt", "a photo of a robot"},
                     {"num_class_images", 2},
                     {"prior_generation_steps", 2},
                     {"sample_batch_size", 2},
                     {"resolution", 64},
                     {"center_crop", true},
                     {"max_steps", 3},
                     {"learning_rate", 1e-4},
                     {"checkpointing_steps", 1000},
                     {"seed", 7},
                     {"device", "cpu"}};
  std::ofstream(dir / "base.json") << base.dump(2);
  const std::string photos = (demo() / "instance").string();
  std::ofstream(dir / "subjects.jsonl")
      << json{{"instance_data_dir", photos}, {"output_dir", "out/anna"}}.dump() << "\n"
      << json{{"instance_data_dir", "photos/empty"}, {"output_dir", "out/bert"}}.dump() << "\n\n"
      << json{{"instance_data_dir", photos}, {"output_dir", "out/carl"}, {"learning_rate", 3e-4}}
             .dump()
      << "\n";
}

std::map<std::string, json> statuses(const fs::path& summary) {
  const json parsed = json::parse(sdtrain::read_file(summary));
  std::map<std::string, json> by_dir;
  for (const auto& record : parsed["subjects"])
    by_dir[fs::path(record["output_dir"].get<std::string>()).filename().string()] = record;
  return by_dir;
}

TEST(Subjects, ThreeSubjectsOneBrokenTrainTheOthersFromOneReadOfTheBase) {
  const fs::path dir = scratch_dir();
  write_subjects(dir);
  const CommandResult run = sdtrain_in(dir, "train --config base.json --subjects subjects.jsonl");
  ASSERT_EQ(run.code, static_cast<int>(sdtrain::ExitCode::subjects_failed)) << run.output;

  auto records = statuses(dir / "subjects-summary.json");
  ASSERT_EQ(records.size(), 3u);
  EXPECT_EQ(records["anna"]["status"], "done");
  EXPECT_EQ(records["carl"]["status"], "done");
  EXPECT_EQ(records["bert"]["status"], "failed");
  EXPECT_EQ(records["bert"]["exit_code"], static_cast<int>(sdtrain::ExitCode::input_data));
  EXPECT_EQ(records["anna"]["steps"], 3);
  EXPECT_TRUE(records["carl"]["final_loss"].is_number());
  for (const char* name : {"anna", "carl"})
    EXPECT_TRUE(fs::exists(dir / "out" / name / "unet" / "diffusion_pytorch_model.safetensors"));
  EXPECT_FALSE(fs::exists(dir / "out" / "bert" / "unet"));

  // Each model component is read from disk once, by class-image generation, for every subject.
  for (const char* component : {"unet", "vae", "text_encoder"})
    EXPECT_EQ(count_of(run.output, std::string("read the ") + component + " weights from disk"), 1)
        << run.output;
  // One class, one folder, generated once.
  EXPECT_EQ(count_of(run.output, "prior preservation: generating"), 1) << run.output;
  ASSERT_TRUE(fs::is_directory(dir / "class_images"));
  int folders = 0;
  for (const auto& entry : fs::directory_iterator(dir / "class_images")) {
    ++folders;
    EXPECT_EQ(std::distance(fs::directory_iterator(entry.path()), fs::directory_iterator()), 2);
  }
  EXPECT_EQ(folders, 1);

  // carl, trained after anna in the same process, equals a run of carl alone: the trained
  // weights were reset from the base and the optimizer state cleared.
  const json carl_config =
      json::parse(sdtrain::read_file(dir / "out" / "carl" / "train_config.json"));
  json alone = carl_config;
  alone["output_dir"] = (dir / "alone").string();
  alone["resume_from_checkpoint"] = "";
  std::ofstream(dir / "alone.json") << alone.dump(2);
  const CommandResult single = sdtrain_in(dir, "train --config alone.json");
  ASSERT_EQ(single.code, 0) << single.output;
  for (const char* file :
       {"unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"})
    EXPECT_EQ(sdtrain::read_file(dir / "out" / "carl" / file),
              sdtrain::read_file(dir / "alone" / file))
        << file;

  // A rerun skips the finished subjects (and fails bert again, still without photos).
  const CommandResult rerun = sdtrain_in(dir, "train --config base.json --subjects subjects.jsonl");
  EXPECT_EQ(rerun.code, static_cast<int>(sdtrain::ExitCode::subjects_failed)) << rerun.output;
  EXPECT_EQ(count_of(rerun.output, "skipped"), 2) << rerun.output;
  EXPECT_EQ(count_of(rerun.output, "weights from disk"), 0) << rerun.output;
  records = statuses(dir / "subjects-summary.json");
  EXPECT_EQ(records["anna"]["status"], "skipped");
  EXPECT_EQ(records["carl"]["status"], "skipped");
  EXPECT_EQ(records["bert"]["exit_code"], static_cast<int>(sdtrain::ExitCode::input_data));
  // ... and so does the next, from a summary whose records say "skipped".
  const CommandResult third = sdtrain_in(dir, "train --config base.json --subjects subjects.jsonl");
  EXPECT_EQ(count_of(third.output, "skipped"), 2) << third.output;
  // An array task of a finished subject knows it from the whole manifest's summary.
  const CommandResult task = sdtrain_in(dir, "train --config base.json --subjects subjects.jsonl",
                                        "SLURM_ARRAY_TASK_ID=2");
  EXPECT_EQ(task.code, 0) << task.output;
  EXPECT_EQ(count_of(task.output, "skipped"), 1) << task.output;
  EXPECT_TRUE(fs::exists(dir / "subjects-summary-2.json"));
}

// A process killed inside a subject (SIGKILL: nothing recorded for it) leaves that subject's
// checkpoints; the rerun resumes it from the last one and trains the rest.
TEST(Subjects, ARerunResumesTheSubjectAKillInterrupted) {
  const fs::path dir = scratch_dir();
  write_subjects(dir);
  {
    std::ofstream manifest(dir / "two.jsonl");
    const std::string photos = (demo() / "instance").string();
    manifest << json{{"instance_data_dir", photos}, {"output_dir", "out/dora"}}.dump() << "\n"
             << json{{"instance_data_dir", photos}, {"output_dir", "out/emil"}}.dump() << "\n";
  }
  const std::string command =
      "train --config base.json --subjects two.jsonl --set checkpointing_steps=1";
  const CommandResult killed = sdtrain_in(dir, command, "SDTRAIN_KILL_AT=step#2");
  EXPECT_NE(killed.code, 0) << killed.output;
  ASSERT_TRUE(fs::exists(dir / "out" / "dora" / "checkpoint-1"));
  EXPECT_FALSE(fs::exists(dir / "out" / "emil"));

  const CommandResult rerun = sdtrain_in(dir, command);
  ASSERT_EQ(rerun.code, 0) << rerun.output;
  EXPECT_NE(rerun.output.find("resuming from " + (dir / "out" / "dora" / "checkpoint-1").string()),
            std::string::npos)
      << rerun.output;
  auto records = statuses(dir / "subjects-summary.json");
  EXPECT_EQ(records["dora"]["status"], "done");
  EXPECT_EQ(records["dora"]["steps"], 3);
  EXPECT_EQ(records["dora"]["steps_this_run"], 2);
  EXPECT_EQ(records["emil"]["status"], "done");
}

TEST(Subjects, AnArrayTaskTrainsTheSubjectItsIndexNames) {
  const fs::path dir = scratch_dir();
  write_subjects(dir);
  struct Case {
    std::string arguments;
    std::string environment;
    std::string source;
    int index;
  };
  for (const Case& c : {Case{"--subject-index 2", "", "--subject-index", 2},
                        Case{"", "SLURM_ARRAY_TASK_ID=2", "SLURM_ARRAY_TASK_ID", 2},
                        Case{"", "AWS_BATCH_JOB_ARRAY_INDEX=0", "AWS_BATCH_JOB_ARRAY_INDEX", 0},
                        Case{"", "JOB_COMPLETION_INDEX=2", "JOB_COMPLETION_INDEX", 0 + 2}}) {
    const CommandResult run = sdtrain_in(
        dir, "train --config base.json --subjects subjects.jsonl --dry-run " + c.arguments,
        c.environment);
    EXPECT_EQ(run.code, 0) << c.source << "\n" << run.output;
    EXPECT_NE(run.output.find("training subject " + std::to_string(c.index) + " of 3 (from " +
                              c.source + ")"),
              std::string::npos)
        << run.output;
    EXPECT_EQ(count_of(run.output, "Plan\n  model:"), 1) << run.output;
    const char* names[] = {"anna", "bert", "carl"};  // the plan is the selected subject's
    EXPECT_NE(run.output.find((dir / "out" / names[c.index]).string() + "\n"), std::string::npos)
        << run.output;
  }
  // The broken subject's own exit code, from an array task.
  const CommandResult broken = sdtrain_in(
      dir, "train --config base.json --subjects subjects.jsonl --dry-run", "SLURM_ARRAY_TASK_ID=1");
  EXPECT_EQ(broken.code, static_cast<int>(sdtrain::ExitCode::input_data)) << broken.output;
  // An index past the manifest names the variable and the range.
  const CommandResult outside =
      sdtrain_in(dir, "train --config base.json --subjects subjects.jsonl --dry-run",
                 "JOB_COMPLETION_INDEX=3");
  EXPECT_EQ(outside.code, static_cast<int>(sdtrain::ExitCode::usage));
  EXPECT_NE(outside.output.find("JOB_COMPLETION_INDEX=3: not a subject index"), std::string::npos)
      << outside.output;
}

const char* no_environment(const char*) { return nullptr; }

TEST(Subjects, SelectionOrderFlagThenSlurmThenAwsBatchThenKubernetes) {
  using sdtrain::train::select_subject;
  std::map<std::string, std::string> variables = {{"SLURM_ARRAY_TASK_ID", "1"},
                                                  {"AWS_BATCH_JOB_ARRAY_INDEX", "2"},
                                                  {"JOB_COMPLETION_INDEX", "3"}};
  auto lookup = [&](const char* name) -> const char* {
    const auto it = variables.find(name);
    return it == variables.end() ? nullptr : it->second.c_str();
  };
  EXPECT_EQ(*select_subject("0", 5, lookup).index, 0);
  EXPECT_FALSE(select_subject("all", 5, lookup).index.has_value());
  EXPECT_EQ(select_subject("", 5, lookup).source, "SLURM_ARRAY_TASK_ID");
  variables.erase("SLURM_ARRAY_TASK_ID");
  EXPECT_EQ(*select_subject("", 5, lookup).index, 2);
  variables.erase("AWS_BATCH_JOB_ARRAY_INDEX");
  EXPECT_EQ(*select_subject("", 5, lookup).index, 3);
  EXPECT_FALSE(select_subject("", 5, no_environment).index.has_value());
  EXPECT_THROW(select_subject("", 3, lookup), sdtrain::ConfigError);  // 3 of 0..2
  EXPECT_THROW(select_subject("-1", 3, lookup), sdtrain::ConfigError);
  EXPECT_THROW(select_subject("1x", 3, lookup), sdtrain::ConfigError);
}

TEST(Subjects, ManifestLinesAreCheckedOneByOne) {
  const fs::path dir = scratch_dir();
  std::ofstream(dir / "m.jsonl") << "{\"instance_data_dir\": \"a\", \"output_dir\": \"o\"}\n"
                                 << "not json\n"
                                 << "{\"instance_data_dir\": \"b\"}\n";
  const auto lines = sdtrain::train::read_subjects_manifest(dir / "m.jsonl");
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[1].line_number, 2);
  EXPECT_FALSE(lines[1].parse_error.empty());
  const auto config = [&](int i) {
    return sdtrain::train::subject_config("", {"pretrained_model_name_or_path=m"}, dir / "m.jsonl",
                                          lines[i], dir);
  };
  const auto first = config(0);
  EXPECT_EQ(fs::path(first.data.instance_data_dir), dir / "a");  // relative to the manifest
  EXPECT_EQ(first.outputs.resume_from_checkpoint, "latest");
  EXPECT_THROW(config(1), sdtrain::ConfigError);
  try {
    config(2);
    FAIL() << "a subject without output_dir was accepted";
  } catch (const sdtrain::ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("line 3: \"output_dir\" is missing"), std::string::npos)
        << e.what();
  }
  std::ofstream(dir / "empty.jsonl") << "\n\n";
  EXPECT_THROW(sdtrain::train::read_subjects_manifest(dir / "empty.jsonl"), sdtrain::ConfigError);
}

TEST(Subjects, ClassFolderNamesSeparateClassesAndSettings) {
  sdtrain::train::TrainConfig config;
  config.class_images.class_prompt = "a photo of a Dog!";
  const std::string dog = sdtrain::train::class_folder_name(config);
  EXPECT_EQ(dog.rfind("a-photo-of-a-dog-", 0), 0u) << dog;
  config.class_images.prior_generation_steps = 20;
  EXPECT_NE(sdtrain::train::class_folder_name(config), dog);
  config.class_images.prior_generation_steps = 50;
  EXPECT_EQ(sdtrain::train::class_folder_name(config), dog);
}

}  // namespace
