#include "sdtrain/cli/generate.h"

#include <unistd.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "generate_support.h"
#include "sdtrain/models/attention_backend.h"
#include "sdtrain/pipeline/stable_diffusion_pipeline.h"
#include "sdtrain/schedulers/sampler.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::cli {

namespace {

std::string scheduler_help() {
  std::string names = "default (the model's own scheduler)";
  for (const auto& name : schedulers::sampler_names()) names += ", " + name;
  return "Sampler: " + names;
}

void check_arguments(const GenerateArguments& args) {
  if (args.steps < 1)
    throw ConfigError("--steps must be at least 1, got " + std::to_string(args.steps));
  if (args.num_images < 1) throw ConfigError("--num-images must be at least 1");
  if (args.batch_size < 1) throw ConfigError("--batch-size must be at least 1");
  if (args.decode_batch_size < 0)
    throw ConfigError("--decode-batch-size must be 0 (the whole batch) or more");
  if (!std::isfinite(args.guidance_scale) || args.guidance_scale < 0) {
    throw ConfigError("--guidance-scale must be a finite number, 0 or more (7.5 is usual)");
  }
  if (args.width < 0 || args.height < 0 || args.width % 8 || args.height % 8) {
    throw ConfigError("--width and --height must be multiples of 8");
  }
  // An unknown sampler name is a usage error whatever the model: check it before loading.
  if (args.scheduler != "default" && !args.scheduler.empty()) {
    schedulers::make_sampler(args.scheduler, schedulers::SchedulerConfig{});
  }
}

std::vector<std::string> attention_backend_choices() {
  std::vector<std::string> names;
  for (const auto& entry : models::attention_backend_names()) names.push_back(entry.first);
  return names;
}

models::AttentionBackend attention_backend(const std::string& name) {
  for (const auto& [spelled, backend] : models::attention_backend_names())
    if (spelled == name) return backend;
  throw ConfigError("--attention-backend " + name +
                    ": choose auto, flash, efficient, cudnn or math");
}

// Which kernels ran the attention of what was generated (models/attention_backend.h).
void log_attention_kernels() {
  const std::string kernels = models::describe_attention_kernels();
  if (!kernels.empty()) log::info(kernels);
}

}  // namespace

void prepare_output(const fs::path& out) {
  std::error_code error;
  fs::create_directories(out, error);
  if (error || !fs::is_directory(out)) {
    throw OutputError(out.string() + ": cannot create the output folder" +
                      (error ? " (" + error.message() + ")" : "") + "; choose another --out");
  }
  if (::access(out.c_str(), W_OK) != 0)
    throw OutputError(out.string() + ": the output folder is not writable");
}

// Progress on stderr: a line redrawn in place on a terminal, a line per batch otherwise.
void report_progress(const pipeline::GenerationProgress& p) {
  const bool tty = ::isatty(STDERR_FILENO) != 0;
  if (tty) {
    std::fprintf(stderr, "\rimages %lld/%lld  step %lld/%lld",
                 static_cast<long long>(p.images_done), static_cast<long long>(p.images),
                 static_cast<long long>(p.step), static_cast<long long>(p.steps));
    if (p.step == p.steps) std::fprintf(stderr, "  (%.3f s)\n", p.batch_seconds);
    std::fflush(stderr);
  } else if (p.step == p.steps) {
    // This batch's own range: images 1..4, 5..8, ... of 16; tools/benchmark_sampling.py reads
    // the seconds.
    char rate[64];
    std::snprintf(rate, sizeof rate, "in %.3f s (%.2f images/s)", p.batch_seconds,
                  static_cast<double>(p.batch_images) / std::max(p.batch_seconds, 1e-9));
    log::info(log::str("sampled images ", p.images_done + 1, "..", p.images_done + p.batch_images,
                       " of ", p.images, " (", p.steps, " steps) ", rate));
  }
}

std::string image_file_name(int64_t seed, int64_t index) {
  char name[64];
  std::snprintf(name, sizeof name, "s%lld-%04lld.png", static_cast<long long>(seed),
                static_cast<long long>(index));
  return name;
}

std::string grid_file_name(int64_t seed) { return "grid-s" + std::to_string(seed) + ".png"; }

void add_single_file_options(CLI::App& command, models::SingleFileOptions& options) {
  command.add_option("--single-file-config", options.single_file_config,
                     "With a single file: a diffusers folder whose configs and tokenizer to use");
  command
      .add_option("--prediction-type", options.single_file_prediction_type,
                  "With a single file: epsilon or v_prediction (default: its .yaml sidecar, "
                  "else epsilon)")
      ->check(CLI::IsMember({"epsilon", "v_prediction"}));
  command.add_flag("--use-ema-weights", options.use_ema_weights,
                   "With a single file: the UNet from its EMA weights (model_ema.*)");
}

void add_generate_options(CLI::App& command, GenerateArguments& args) {
  command
      .add_option("-m,--model", args.model,
                  "Diffusers model folder (model_index.json, unet/, vae/, ...) or SD 1.x/2.x "
                  "single .safetensors file")
      ->required();
  add_single_file_options(command, args.single_file);
  command.add_option("-p,--prompt", args.prompt, "Text prompt (required without --jobs)");
  command.add_option("-n,--negative-prompt", args.negative_prompt,
                     "Negative prompt (the unconditional branch of guidance)");
  command.add_option("--steps", args.steps, "Sampling steps")->capture_default_str();
  command
      .add_option("-g,--guidance-scale", args.guidance_scale,
                  "Classifier-free guidance scale (off at 1 or below)")
      ->capture_default_str();
  command.add_option("-s,--scheduler", args.scheduler, scheduler_help())->capture_default_str();
  command
      .add_option("--seed", args.seed,
                  "Seed of the CPU generator (as torch.Generator(\"cpu\").manual_seed)")
      ->capture_default_str();
  command.add_option("--num-images", args.num_images, "Images to generate")->capture_default_str();
  command.add_option("--batch-size", args.batch_size, "Images per UNet batch")
      ->capture_default_str();
  command
      .add_option("--decode-batch-size", args.decode_batch_size,
                  "Images per VAE decode, 0 for the whole batch (1 holds the least memory)")
      ->capture_default_str();
  command
      .add_option("--width", args.width, "Image width, a multiple of 8 (default: the model's size)")
      ->check(CLI::PositiveNumber);
  command
      .add_option("--height", args.height,
                  "Image height, a multiple of 8 (default: the model's size)")
      ->check(CLI::PositiveNumber);
  command.add_option("--dtype", args.dtype, "auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16")
      ->capture_default_str();
  command.add_option("--device", args.device, "auto, cpu, cuda or cuda:N")->capture_default_str();
  command.add_option("--variant", args.variant, "Weight file variant, e.g. fp16");
  command.add_option("-o,--out", args.out, "Output folder")->capture_default_str();
  command.add_flag("--grid", args.grid, "Also write all images as one grid image");
  command.add_flag("--fused-group-norm-silu", args.fused_group_norm_silu,
                   "Run the UNet's and VAE's GroupNorms (+ SiLU) as one node each, with CUDA "
                   "kernels (compute.fused_group_norm_silu, docs/performance.md)");
  command.add_flag("--channels-last", args.channels_last,
                   "Store the UNet's and VAE's convolution weights channels-last (NHWC), as "
                   "compute.channels_last (docs/performance.md)");
  command
      .add_option("--attention-backend", args.attention_backend,
                  "The attention kernel tried first: auto, flash, efficient, cudnn or math, as "
                  "compute.attention_backend (docs/performance.md)")
      ->check(CLI::IsMember(attention_backend_choices()))
      ->capture_default_str();
  command.add_option(
      "--lora", args.loras,
      "LoRA adapter file[:scale] (diffusers or kohya layout); repeatable, several are folded "
      "into the weights");
  command
      .add_option(
          "--jobs", args.jobs,
          "JSON-lines file of jobs {\"prompt\", \"seed\", \"num_images\", \"out\", \"lora\", "
          "\"scale\"} run on one loaded base")
      ->check(CLI::ExistingFile);
}

pipeline::GenerationOptions generation_options(const GenerateArguments& args,
                                               const pipeline::StableDiffusionPipeline& sd) {
  pipeline::GenerationOptions options;
  options.prompts = {args.prompt};
  options.negative_prompt = args.negative_prompt;
  options.steps = args.steps;
  options.guidance_scale = args.guidance_scale;
  options.scheduler = args.scheduler;
  options.seed = args.seed;
  options.width = args.width > 0 ? args.width : sd.default_width();
  options.height = args.height > 0 ? args.height : sd.default_height();
  options.num_images = args.num_images;
  options.batch_size = args.batch_size;
  options.decode_batch_size = args.decode_batch_size;
  options.progress = report_progress;
  return options;
}

std::string dtype_name(c10::ScalarType dtype) {
  return dtype == torch::kFloat32 ? "fp32" : dtype == torch::kFloat16 ? "fp16" : "bf16";
}

void write_images(const GenerateArguments& args, const pipeline::GenerationOptions& options,
                  const std::vector<io::Image>& images, const std::string& sampler,
                  c10::ScalarType dtype) {
  const fs::path out = args.out;
  for (std::size_t i = 0; i < images.size(); ++i) {
    const fs::path path = out / image_file_name(args.seed, static_cast<int64_t>(i));
    std::vector<std::pair<std::string, std::string>> text = {
        {"prompt", args.prompt},
        {"negative_prompt", args.negative_prompt},
        {"steps", std::to_string(args.steps)},
        {"guidance_scale", log::str(args.guidance_scale)},
        {"scheduler", sampler},
        {"seed", std::to_string(args.seed)},
        {"image_index", std::to_string(i)},
        {"width", std::to_string(options.width)},
        {"height", std::to_string(options.height)},
        {"dtype", dtype_name(dtype)},
        {"model", fs::absolute(args.model).lexically_normal().string()},
        {"software", std::string("sdtrain ") + SDTRAIN_VERSION}};
    if (!args.loras.empty()) text.emplace_back("lora", nlohmann::json(args.loras).dump());
    io::write_png(path, images[i], text);
    std::cout << path.string() << "\n";
  }
  if (args.grid) {
    const int columns = static_cast<int>(std::ceil(std::sqrt(static_cast<double>(images.size()))));
    const fs::path path = out / grid_file_name(args.seed);
    io::write_png(path, io::make_image_grid(images, columns),
                  {{"prompt", args.prompt},
                   {"seed", std::to_string(args.seed)},
                   {"scheduler", sampler},
                   {"software", std::string("sdtrain ") + SDTRAIN_VERSION}});
    std::cout << path.string() << "\n";
  }
}

void generate_and_write(const GenerateArguments& args, pipeline::StableDiffusionPipeline& sd) {
  prepare_output(args.out);
  const pipeline::GenerationOptions options = generation_options(args, sd);
  const std::string sampler = sd.sampler_name(args.scheduler);
  const c10::ScalarType dtype = sd.settings().dtype;
  log::info(log::str("generating ", args.num_images, " image(s) ", options.width, "x",
                     options.height, " with ", sampler, ", ", args.steps, " steps, guidance ",
                     args.guidance_scale, ", seed ", args.seed, " on ", sd.settings().device.str(),
                     " (", dtype_name(dtype), ")"));
  write_images(args, options, sd.generate(options), sampler, dtype);
}

int run_generate(const GenerateArguments& args) {
  check_arguments(args);
  if (args.jobs.empty() && args.prompt.empty())
    throw ConfigError("--prompt is required (or --jobs FILE)");
  std::vector<LoRAChoice> loras;
  for (const auto& text : args.loras) loras.push_back(parse_lora_choice(text));
  const torch::Device device = pipeline::resolve_device(args.device);
  const c10::ScalarType dtype = pipeline::resolve_dtype(args.dtype, device);
  if (args.jobs.empty()) prepare_output(args.out);

  const models::PreferredAttentionBackend preferred(attention_backend(args.attention_backend));
  const auto started = std::chrono::steady_clock::now();
  pipeline::PipelineSettings settings{device, dtype, args.variant, args.single_file};
  settings.fused_group_norm_silu = args.fused_group_norm_silu;
  settings.channels_last = args.channels_last;
  auto sd = pipeline::StableDiffusionPipeline::from_folder(args.model, settings);
  log::info(log::str("loaded the base model ", args.model, " from disk in ",
                     format_seconds(std::chrono::steady_clock::now() - started)));
  if (!args.jobs.empty()) {
    const int code = run_generation_jobs(args, sd);
    log_attention_kernels();
    return code;
  }
  apply_loras(sd, loras);
  generate_and_write(args, sd);
  log_attention_kernels();
  return 0;
}

}  // namespace sdtrain::cli
