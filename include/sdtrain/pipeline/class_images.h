#pragma once
// Prior-preservation class images (DreamBooth, diffusers train_dreambooth.py): count the images
// already in class_data_dir and generate only the missing ones up to num_class_images with the
// class prompt. Resumable: image k (counting every image in the folder) is written as
// class-<k, 6 digits>.png, atomically, from its own generator seeded seed + k, so an interrupted
// run continues where it stopped and produces the same files as an uninterrupted one.

#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "sdtrain/pipeline/stable_diffusion_pipeline.h"

namespace sdtrain::pipeline {

struct ClassImageOptions {
  std::filesystem::path class_data_dir;  // created when absent
  std::string class_prompt;
  std::string negative_prompt;
  int64_t num_class_images = 100;
  int64_t sample_batch_size = 4;
  std::string scheduler;  // "" / "default": the model's own, as diffusers' train_dreambooth.py
  int64_t steps = 50;
  double guidance_scale = 7.5;
  int64_t seed = 0;
  int64_t width = 0;  // 0: the model's default size (the trainer passes its resolution)
  int64_t height = 0;
  // Stop after writing this many images (tests simulate an interrupted run with it).
  std::optional<int64_t> limit;
  // The image numbers to write instead of the missing ones: a data-parallel process's share of
  // the list every process took before any wrote (train/run_setup.cpp).
  std::optional<std::vector<int64_t>> indices;
};

struct ClassImageProgress {
  int64_t written = 0;  // images written by this run so far
  int64_t missing = 0;  // images this run set out to write
  int64_t step = 0;     // sampling step of the current batch
  int64_t steps = 0;
};

// Images (png/jpg/jpeg, any case) directly in `dir`; 0 when the folder does not exist.
int64_t count_class_images(const std::filesystem::path& dir);

// The numbers of the images generate_class_images would write to have `wanted` in `dir`:
// continuing from the count, passing over names that exist (a folder with gaps).
std::vector<int64_t> missing_class_image_indices(const std::filesystem::path& dir, int64_t wanted);

// Generates the missing class images with `pipeline`; returns how many were written. A folder
// that cannot be created or written is an OutputError (exit code 5).
int64_t generate_class_images(StableDiffusionPipeline& pipeline, const ClassImageOptions& options,
                              const std::function<void(const ClassImageProgress&)>& progress = {});

// Same, loading the model folder only when images are missing, and releasing the sampler's
// GPU memory before returning (training allocates next).
int64_t generate_class_images(const std::filesystem::path& model_dir, const PipelineSettings& settings,
                              const ClassImageOptions& options,
                              const std::function<void(const ClassImageProgress&)>& progress = {});
int64_t generate_class_images(const io::ModelFolder& base, const PipelineSettings& settings,
                              const ClassImageOptions& options,
                              const std::function<void(const ClassImageProgress&)>& progress = {});

}  // namespace sdtrain::pipeline
