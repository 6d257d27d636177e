#include "sdtrain/pipeline/class_images.h"

#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>

#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::pipeline {

namespace {

fs::path class_image_path(const fs::path& dir, int64_t index) {
  char name[32];
  std::snprintf(name, sizeof name, "class-%06lld.png", static_cast<long long>(index));
  return dir / name;
}

void prepare_folder(const fs::path& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error || !fs::is_directory(dir)) {
    throw OutputError(dir.string() + ": cannot create the class image folder (" + error.message() + ")");
  }
}

std::vector<std::pair<std::string, std::string>> metadata(const ClassImageOptions& options, const std::string& sampler,
                                                          int64_t seed, int64_t width, int64_t height) {
  return {{"prompt", options.class_prompt},
          {"negative_prompt", options.negative_prompt},
          {"steps", std::to_string(options.steps)},
          {"guidance_scale", log::str(options.guidance_scale)},
          {"scheduler", sampler},
          {"seed", std::to_string(seed)},
          {"width", std::to_string(width)},
          {"height", std::to_string(height)},
          {"software", std::string("sdtrain ") + SDTRAIN_VERSION + " (class image)"}};
}

}  // namespace

int64_t count_class_images(const fs::path& dir) {
  if (!fs::is_directory(dir)) return 0;
  int64_t count = 0;
  for (const auto& entry : fs::directory_iterator(dir)) {
    if (entry.is_regular_file() && io::is_image_file(entry.path())) ++count;
  }
  return count;
}

std::vector<int64_t> missing_class_image_indices(const fs::path& dir, int64_t wanted) {
  const int64_t present = count_class_images(dir);
  std::vector<int64_t> indices;
  for (int64_t index = present; static_cast<int64_t>(indices.size()) < wanted - present; ++index) {
    if (!fs::exists(class_image_path(dir, index))) indices.push_back(index);
  }
  return indices;
}

int64_t generate_class_images(StableDiffusionPipeline& pipeline, const ClassImageOptions& options,
                              const std::function<void(const ClassImageProgress&)>& progress) {
  if (options.class_prompt.empty()) throw ConfigError("class images need a class_prompt");
  if (options.sample_batch_size < 1) throw ConfigError("sample_batch_size must be at least 1");
  prepare_folder(options.class_data_dir);
  const int64_t present = count_class_images(options.class_data_dir);
  std::vector<int64_t> indices =
      options.indices ? *options.indices
                      : missing_class_image_indices(options.class_data_dir, options.num_class_images);
  if (options.limit && static_cast<int64_t>(indices.size()) > *options.limit)
    indices.resize(static_cast<size_t>(*options.limit));
  const int64_t missing = static_cast<int64_t>(indices.size());
  if (missing == 0) return 0;

  const int64_t width = options.width > 0 ? options.width : pipeline.default_width();
  const int64_t height = options.height > 0 ? options.height : pipeline.default_height();
  const std::string sampler = pipeline.sampler_name(options.scheduler);
  log::info(log::str("class images: ", present, " in ", options.class_data_dir.string(), ", generating ", missing,
                     " (", sampler, ", ", options.steps, " steps, guidance ", options.guidance_scale, ")"));

  const auto started = std::chrono::steady_clock::now();
  int64_t written = 0;
  for (std::size_t first = 0; first < indices.size(); first += options.sample_batch_size) {
    const std::size_t count = std::min<std::size_t>(options.sample_batch_size, indices.size() - first);
    GenerationOptions request;
    request.prompts = {options.class_prompt};
    request.negative_prompt = options.negative_prompt;
    request.steps = options.steps;
    request.guidance_scale = options.guidance_scale;
    request.scheduler = options.scheduler;
    request.width = width;
    request.height = height;
    request.num_images = static_cast<int64_t>(count);
    request.batch_size = static_cast<int64_t>(count);
    for (std::size_t i = first; i < first + count; ++i) {
      request.generators.push_back(at::detail::createCPUGenerator(static_cast<uint64_t>(options.seed + indices[i])));
    }
    if (progress) {
      request.progress = [&](const GenerationProgress& p) { progress({written, missing, p.step, p.steps}); };
    }
    const auto images = pipeline.generate(request);
    for (std::size_t i = 0; i < count; ++i) {
      const int64_t index = indices[first + i];
      io::write_png(class_image_path(options.class_data_dir, index), images[i],
                    metadata(options, sampler, options.seed + index, width, height));
      ++written;
    }
    if (progress) progress({written, missing, options.steps, options.steps});
  }
  // The pipeline is loaded: this is the sampling rate (PNG writing included) that
  // tools/benchmark_sampling.py sets beside diffusers' pipeline.
  const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - started;
  char rate[96];
  std::snprintf(rate, sizeof rate, "%.3f s (%.3f images/s)", seconds.count(),
                static_cast<double>(written) / std::max(seconds.count(), 1e-9));
  log::info(log::str("class images: generated ", written, " in ", rate));
  return written;
}

namespace {

template <typename Base>
int64_t generate_with_base(const Base& base, const PipelineSettings& settings,
                           const ClassImageOptions& options,
                           const std::function<void(const ClassImageProgress&)>& progress) {
  if (options.indices ? options.indices->empty()
                      : count_class_images(options.class_data_dir) >= options.num_class_images)
    return 0;
  int64_t written = 0;
  {
    auto pipeline = StableDiffusionPipeline::from_folder(base, settings);
    written = generate_class_images(pipeline, options, progress);
  }
  release_cached_gpu_memory();
  return written;
}

}  // namespace

int64_t generate_class_images(const fs::path& model_dir, const PipelineSettings& settings,
                              const ClassImageOptions& options,
                              const std::function<void(const ClassImageProgress&)>& progress) {
  return generate_with_base(model_dir, settings, options, progress);
}

int64_t generate_class_images(const io::ModelFolder& base, const PipelineSettings& settings,
                              const ClassImageOptions& options,
                              const std::function<void(const ClassImageProgress&)>& progress) {
  return generate_with_base(base, settings, options, progress);
}

}  // namespace sdtrain::pipeline
