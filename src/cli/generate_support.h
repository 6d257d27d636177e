#pragma once
// Pieces `sdtrain generate` shares with its --jobs runner, `merge-lora` and `convert` (src/cli
// only).

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include <CLI/CLI.hpp>

#include "sdtrain/cli/generate.h"
#include "sdtrain/models/single_file_config.h"
#include "sdtrain/pipeline/stable_diffusion_pipeline.h"

namespace sdtrain::cli {

// --single-file-config, --prediction-type and --use-ema-weights: how a command that takes
// --model reads a single-file base (generate, convert; docs/single_file.md).
void add_single_file_options(CLI::App& command, models::SingleFileOptions& options);

// Creates `out` if needed; OutputError when it cannot be written.
void prepare_output(const std::filesystem::path& out);
void report_progress(const pipeline::GenerationProgress& p);
// The request `args` describe, on `sd` (its default size when none is given).
pipeline::GenerationOptions generation_options(const GenerateArguments& args,
                                               const pipeline::StableDiffusionPipeline& sd);
// Generates what `args` ask with `sd` as it is now and writes the PNGs (and grid) to args.out.
void generate_and_write(const GenerateArguments& args, pipeline::StableDiffusionPipeline& sd);

// Puts the adapters on the pipeline's UNet and text encoder: one file is attached (and can be
// removed again); several are folded into the weights one after another, as diffusers'
// fuse_lora, since a layer carries one adapter. ModelError (exit 3) for a file that does not fit.
void apply_loras(pipeline::StableDiffusionPipeline& sd, const std::vector<LoRAChoice>& loras);
// Removes every attached adapter: the base as loaded.
void remove_loras(pipeline::StableDiffusionPipeline& sd);

// `generate --jobs FILE`: every line a job on the already loaded `sd`.
int run_generation_jobs(const GenerateArguments& args, pipeline::StableDiffusionPipeline& sd);

inline std::string format_seconds(std::chrono::steady_clock::duration elapsed) {
  char text[32];
  std::snprintf(text, sizeof text, "%.3f s", std::chrono::duration<double>(elapsed).count());
  return text;
}

}  // namespace sdtrain::cli
