#include "sdtrain/cli/cli.h"

#include <c10/util/Exception.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <set>

#include "sdtrain/cli/convert.h"
#include "sdtrain/cli/generate.h"
#include "sdtrain/cli/inspect.h"
#include "sdtrain/train/distributed.h"
#include "sdtrain/train/plan.h"
#include "sdtrain/train/subjects.h"
#include "sdtrain/train/train_config.h"
#include "sdtrain/train/trainer.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::cli {

namespace {
constexpr const char* kHostMemoryFix =
    "\n  lower resolution or train_batch_size (generate: the image size or --batch-size), or free memory";


constexpr const char* kExamples = R"(Examples:
  sdtrain --config configs/cat.json                 train (same as `sdtrain train --config ...`)
  sdtrain --config cat.json --set max_steps=800     override a key of the file
  sdtrain --config cat.json --dry-run               check config, model and data; print the plan
  sdtrain --config base.json --subjects subjects.jsonl   many subjects, the base read once
  torchrun --no-python --standalone --nproc-per-node 4 sdtrain --config cat.json   data parallel
  sdtrain inspect path/to/stable-diffusion-2-1-base components, tensors, parameter totals
  sdtrain generate --model DIR --prompt "a photo of a cat" --scheduler euler --seed 1 --out out
                                                    text to image (samplers: docs/sampling.md)
  sdtrain generate --model BASE --lora out/pytorch_lora_weights.safetensors:0.8 --prompt ...
  sdtrain generate --model BASE --jobs jobs.jsonl   many prompts/adapters on one loaded base
  sdtrain merge-lora --model BASE --lora FILE --out DIR   fold an adapter into a full model
  sdtrain convert --model DIR --out model.safetensors     a diffusers folder as one single file
  sdtrain convert --model model.safetensors --out DIR     a single file as a diffusers folder

Exit codes: 0 success, 1 usage/config, 2 input data, 3 model, 4 out of GPU memory,
5 output not writable, 6 training diverged, 7 subjects failed (--subjects: the summary says which),
8 another data-parallel process stopped, 130/143 interrupted (after saving a resumable checkpoint).
Every configuration key: docs/configuration.md)";

struct TrainArguments {
  std::string config_file;
  std::vector<std::string> overrides;
  bool dry_run = false;
  bool overwrite = false;
  std::string dump_steps;
  std::string subjects;       // a subjects manifest (docs/scaling.md)
  std::string subject_index;  // "", "all" or N
  std::string summary;
};

struct InspectArguments {
  std::string path;
  bool json = false;
};

int run_subjects(const TrainArguments& args) {
  if (train::data_parallel_from(process_environment()).world_size > 1)
    throw ConfigError("--subjects under torchrun: subjects are trained one process each; start "
                      "one sdtrain per GPU as an array job instead (docs/scaling.md)");
  if (args.overwrite)
    throw ConfigError("--overwrite does not apply to --subjects: a rerun skips finished subjects "
                      "and resumes interrupted ones; remove a subject's output_dir to retrain it");
  train::SubjectsOptions options;
  options.config_file = args.config_file;
  options.overrides = args.overrides;
  options.manifest = args.subjects;
  options.subject_index = args.subject_index;
  options.summary = args.summary;
  options.dry_run = args.dry_run;
  return train::run_subjects(options);
}

int run_train(const TrainArguments& args) {
  if (!args.subjects.empty()) return run_subjects(args);
  if (!args.subject_index.empty() || !args.summary.empty())
    throw ConfigError("--subject-index and --summary apply to a subjects manifest: add "
                      "--subjects FILE (docs/scaling.md)");
  auto config = train::load_train_config(args.config_file, args.overrides);
  // Under torchrun (docs/scaling.md) the other processes keep to warnings: one log, rank 0's.
  const train::DataParallel parallel = train::data_parallel_from(process_environment());
  if (!parallel.is_main()) log::set_level(log::Level::warn);
  auto plan = train::plan_training(config, parallel);
  if (parallel.is_main())
    std::cout << "Resolved configuration\n" << plan.config.to_json().dump(2) << "\n\n" << train::format_plan(plan);
  if (parallel.is_main()) {
    for (const auto& warning : plan.warnings) log::warn(warning);
    for (const auto& note : plan.setting_notes) log::warn(note);
  }
  if (args.dry_run) {
    log::info("dry run: configuration, model folder and data are valid; nothing was written");
    return 0;
  }
  train::TrainOptions options;
  options.overwrite = args.overwrite;
  options.dump_dir = args.dump_steps;
  const train::TrainSummary summary = train::run_training(plan, options);
  log::info(train::format_summary(summary));
  return 0;
}

// The key table of docs/configuration.md, printed from the same table the parser uses.
int print_config_reference() {
  std::cout << "| key | type | default | meaning |\n|---|---|---|---|\n";
  for (const auto& key : train::config_keys()) {
    std::string name = "`" + key.name + "`";
    for (const auto& alias : key.aliases) name += " (alias `" + alias + "`)";
    std::cout << "| " << name << " | " << key.type << " | `" << key.default_value << "` | " << key.help << " |\n";
  }
  return 0;
}

int run_inspect(const InspectArguments& args) {
  auto inspection = inspect(args.path);
  std::cout << (args.json ? inspection.dump(2) + "\n" : format_inspection(inspection));
  return 0;
}

// `sdtrain --config X` means `sdtrain train --config X`.
std::vector<std::string> with_default_command(int argc, char** argv) {
  static const std::set<std::string> commands = {"train", "inspect", "generate", "merge-lora", "convert",
                                                 "config-reference"};
  static const std::set<std::string> top_level = {"-h", "--help", "--version"};
  std::vector<std::string> args(argv + 1, argv + argc);
  if (!args.empty() && !commands.count(args[0]) && !top_level.count(args[0])) args.insert(args.begin(), "train");
  std::reverse(args.begin(), args.end());  // CLI11 takes the vector in reverse order
  return args;
}

}  // namespace

int run(int argc, char** argv) {
  CLI::App app{"sdtrain: DreamBooth fine-tuning for Stable Diffusion (diffusers model folders in, diffusers folder out)",
               "sdtrain"};
  app.set_version_flag("--version", std::string("sdtrain ") + SDTRAIN_VERSION);
  app.footer(kExamples);
  app.require_subcommand(1);
  bool verbose = false, quiet = false;
  app.add_flag("-v,--verbose", verbose, "Debug log lines");
  app.add_flag("-q,--quiet", quiet, "Warnings and errors only");

  TrainArguments train_args;
  auto* train = app.add_subcommand("train", "Fine-tune a Stable Diffusion model on a few photos (DreamBooth)");
  train->add_option("-c,--config", train_args.config_file, "JSON configuration file")->required()->check(CLI::ExistingFile);
  train->add_option("--set", train_args.overrides, "Override a configuration key: --set key=value (repeatable)");
  train->add_flag("--dry-run", train_args.dry_run, "Validate configuration, model folder and data, print the plan, write nothing");
  train->add_flag("--overwrite", train_args.overwrite,
                  "Start afresh in an output_dir that already holds a run (removes its checkpoints)");
  train->add_option("--subjects", train_args.subjects,
                    "Train many subjects: a JSON-lines file, one subject's keys per line over --config "
                    "(docs/scaling.md)")
      ->check(CLI::ExistingFile);
  train->add_option("--subject-index", train_args.subject_index,
                    "With --subjects: train only subject N (0-based), or \"all\"; default: "
                    "SLURM_ARRAY_TASK_ID, AWS_BATCH_JOB_ARRAY_INDEX or JOB_COMPLETION_INDEX when set");
  train->add_option("--summary", train_args.summary,
                    "With --subjects: where to write the summary (default: beside the manifest)");
  // Hidden: per-micro-batch inputs and losses for tools/dreambooth_reference.py (parity tests).
  train->add_option("--dump-steps", train_args.dump_steps, "")->group("");

  InspectArguments inspect_args;
  auto* inspect_command = app.add_subcommand("inspect", "Show the components, tensors and parameter totals of a model folder or .safetensors file");
  inspect_command->add_option("path", inspect_args.path, "Model folder, component folder or .safetensors file")->required();
  inspect_command->add_flag("--json", inspect_args.json, "Machine-readable output");

  GenerateArguments generate_args;
  auto* generate = app.add_subcommand("generate", "Generate images from a prompt with a diffusers model folder");
  add_generate_options(*generate, generate_args);

  MergeLoRAArguments merge_args;
  auto* merge = app.add_subcommand("merge-lora", "Fold LoRA adapters into a base model, written as a diffusers folder");
  add_merge_lora_options(*merge, merge_args);

  ConvertArguments convert_args;
  auto* convert = app.add_subcommand(
      "convert", "Write a model in the other layout: diffusers folder <-> single .safetensors file");
  add_convert_options(*convert, convert_args);

  auto* reference = app.add_subcommand("config-reference", "Print the configuration keys as a Markdown table");
  reference->group("");  // hidden: it writes docs/configuration.md

  try {
    auto args = with_default_command(argc, argv);
    app.parse(args);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e);
    return code == 0 ? 0 : static_cast<int>(ExitCode::usage);
  }
  log::set_level(verbose ? log::Level::debug : quiet ? log::Level::warn : log::Level::info);

  try {
    if (*train) return run_train(train_args);
    if (*reference) return print_config_reference();
    if (*generate) return run_generate(generate_args);
    if (*merge) return run_merge_lora(merge_args);
    if (*convert) return run_convert(convert_args);
    return run_inspect(inspect_args);
  } catch (const Error& e) {
    log::error(e.what());
    return static_cast<int>(e.code());
  } catch (const c10::OutOfMemoryError& e) {
    log::error(
        std::string("out of GPU memory: ") + e.what_without_backtrace() +
        "\n  lower train_batch_size or resolution, or set gradient_checkpointing: true, "
        "optimizer: \"adamw8bit\", mixed_precision: \"fp16\" (generate: lower --batch-size or the "
        "image size, set --decode-batch-size 1, or use --dtype fp16)");
    return static_cast<int>(ExitCode::out_of_memory);
  } catch (const std::bad_alloc&) {
    log::error(std::string("out of memory: an allocation failed") + kHostMemoryFix);
    return static_cast<int>(ExitCode::out_of_memory);
  } catch (const c10::Error& e) {
    if (std::string(e.what_without_backtrace()).find("can't allocate memory") == std::string::npos) {
      log::error(std::string("internal error: ") + e.what_without_backtrace());
      return static_cast<int>(ExitCode::usage);
    }
    log::error(std::string("out of memory: ") + e.what_without_backtrace() + kHostMemoryFix);
    return static_cast<int>(ExitCode::out_of_memory);
  } catch (const std::exception& e) {
    log::error(std::string("internal error: ") + e.what());
    return static_cast<int>(ExitCode::usage);
  }
}

}  // namespace sdtrain::cli
