#pragma once
// What a training run will do, worked out from the configuration, the model folder's headers
// and the data before any weight is loaded: `--dry-run` prints it, training starts from it.

#include <cstdint>
#include <string>
#include <vector>

#include "sdtrain/train/instance_data.h"
#include "sdtrain/train/distributed.h"
#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

struct ComponentSize {
  std::string name;
  int64_t parameters = 0;
  std::vector<int64_t> tensor_sizes;  // element count of each tensor
  // train_mode "lora": element count of each adapter tensor the run adds (A and B per layer).
  std::vector<int64_t> adapter_tensor_sizes;
};

struct MemoryEstimate {
  // Bytes on the training device at the peak of a step, by item (train/memory_plan.h).
  int64_t trained_weights = 0;
  int64_t gradients = 0;
  int64_t optimizer_state = 0;
  int64_t frozen_weights = 0;
  int64_t autocast_copies = 0;  // half copies of fp32 weights saved for backward
  int64_t activations = 0;
  // use_ema without offload_ema: float32 copies of the UNet's trained weights
  int64_t ema_shadow = 0;
  int64_t total() const {
    return trained_weights + gradients + optimizer_state + frozen_weights + autocast_copies +
           activations + ema_shadow;
  }
};

struct TrainingPlan {
  TrainConfig config;  // prompts and class_data_dir filled in
  std::string device;  // "cpu", "cuda", "cuda:1"
  std::vector<ImageSummary> instance_images;
  int64_t class_images_present = 0;
  int64_t class_images_to_generate = 0;
  int64_t dataset_length = 0;   // samples per epoch, as diffusers counts them
  int64_t steps_per_epoch = 0;  // optimizer steps
  int64_t total_steps = 0;
  int64_t epochs = 0;
  std::vector<ComponentSize> components;  // unet, text_encoder, vae
  std::vector<std::string> base_notes;     // a single-file base: what was decided, and why
  MemoryEstimate memory;
  // fused_backward_pass as decided (memory_plan.h), and each setting the plan changed or gave a
  // new meaning, with why: printed at start-up and by --dry-run.
  bool fused_backward_pass = false;
  // cuda_graphs as decided (micro_batch_pass.h): the trainer captures the pass.
  bool cuda_graphs = false;
  std::vector<std::string> setting_notes;
  // torchrun's processes (docs/scaling.md): each takes train_batch_size samples of every global
  // batch of train_batch_size x world_size.
  DataParallel parallel;
  int64_t global_batch_size = 1;
  std::vector<std::string> warnings;
};

// Checks the model folder (configs and weight headers), the instance data (every image
// decoded), prompts, class images and device, and derives the schedule. Throws the
// documented errors (ConfigError, InputDataError, ModelError).
TrainingPlan plan_training(const TrainConfig& config, const DataParallel& parallel = {});

std::string format_plan(const TrainingPlan& plan);

}  // namespace sdtrain::train
