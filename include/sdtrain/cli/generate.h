#pragma once
// `sdtrain generate`: text-to-image with a diffusers model folder (docs/sampling.md). Image i of
// a run is the i-th image diffusers' StableDiffusionPipeline returns for the same prompt,
// sampler, steps, guidance and size with generator=torch.Generator("cpu").manual_seed(seed)
// and num_images_per_prompt = num_images (for euler_a, whose steps draw noise, when
// batch_size = num_images).

#include <cstdint>
#include <string>
#include <vector>

#include "sdtrain/io/image.h"
#include "sdtrain/models/single_file_config.h"

namespace CLI {
class App;
}

namespace sdtrain::cli {

struct GenerateArguments {
  std::string model;
  std::string prompt;
  std::string negative_prompt;
  int64_t steps = 50;
  double guidance_scale = 7.5;
  std::string scheduler = "default";
  int64_t seed = 0;
  int64_t num_images = 1;
  int64_t batch_size = 1;
  int64_t decode_batch_size = 0;  // 0: the whole batch
  int64_t width = 0;   // 0: the model's default
  int64_t height = 0;
  std::string dtype = "auto";
  std::string device = "auto";
  std::string variant;
  models::SingleFileOptions single_file;  // --model FILE.safetensors (docs/single_file.md)
  std::string out = "generated";
  bool grid = false;
  std::vector<std::string> loras;  // "FILE[:SCALE]", either LoRA layout (docs/lora.md)
  std::string jobs;                // JOBS.jsonl: many requests on one loaded base
  // The trainer's compute settings of the same names (docs/performance.md).
  bool fused_group_norm_silu = false;
  bool channels_last = false;
  std::string attention_backend = "auto";  // compute.attention_backend
};

// Registers the subcommand's options on `command`.
void add_generate_options(CLI::App& command, GenerateArguments& args);
// Validates, loads the model, writes the images; throws sdtrain::Error. With --jobs, runs every
// job and returns 0, or the exit code of the first job that failed (each failure is logged
// with its line number; the other jobs still run).
int run_generate(const GenerateArguments& args);

// A LoRA file and the multiplier of its output ("FILE[:SCALE]", scale 1 when absent).
struct LoRAChoice {
  std::string file;
  double scale = 1.0;
};
LoRAChoice parse_lora_choice(const std::string& text);

// `sdtrain merge-lora`: the base with the adapters folded into its weights, a diffusers folder.
struct MergeLoRAArguments {
  std::string model;
  std::vector<std::string> loras;
  std::string out;
  std::string dtype = "fp32";
};
void add_merge_lora_options(CLI::App& command, MergeLoRAArguments& args);
int run_merge_lora(const MergeLoRAArguments& args);

// File names: <out>/s<seed>-<index, 4 digits>.png and <out>/grid-s<seed>.png.
std::string image_file_name(int64_t seed, int64_t index);
std::string grid_file_name(int64_t seed);

}  // namespace sdtrain::cli
