#include "sdtrain/train/run_setup.h"

#include <chrono>

#include "sdtrain/models/group_norm_silu.h"
#include "sdtrain/models/load_components.h"
#include "sdtrain/models/lora_adapters.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/pipeline/class_images.h"
#include "sdtrain/pipeline/stable_diffusion_pipeline.h"
#include "sdtrain/train/device_memory.h"
#include "sdtrain/train/interrupt.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"
#include "sdtrain/util/progress.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

pipeline::ClassImageOptions class_image_options(const TrainConfig& config) {
  pipeline::ClassImageOptions options;
  options.class_data_dir = config.class_images.class_data_dir;
  options.class_prompt = config.class_images.class_prompt;
  options.num_class_images = config.class_images.num_class_images;
  options.sample_batch_size = config.class_images.sample_batch_size;
  options.scheduler = config.class_images.prior_generation_scheduler;
  options.steps = config.class_images.prior_generation_steps;
  options.guidance_scale = config.class_images.prior_generation_guidance_scale;
  options.seed = config.seed;
  // At the training resolution: the dataset resizes to it anyway (diffusers samples at the
  // model's default size, 512 for SD 2.1-base, the same for the usual resolution).
  options.width = options.height = config.data.resolution;
  return options;
}

}  // namespace

void generate_class_images(const TrainingPlan& plan, const io::ModelFolder& base,
                           torch::Device device, ProcessGroup* group) {
  const TrainConfig& config = plan.config;
  if (!config.class_images.with_prior_preservation || plan.class_images_to_generate <= 0) return;
  pipeline::ClassImageOptions options = class_image_options(config);
  int64_t to_write = plan.class_images_to_generate;
  if (group) {
    // Every process lists the missing images before any writes one, then writes its share.
    group->barrier();
    const std::vector<int64_t> missing =
        pipeline::missing_class_image_indices(options.class_data_dir, options.num_class_images);
    group->barrier();
    options.indices.emplace();
    for (size_t i = static_cast<size_t>(group->rank()); i < missing.size();
         i += static_cast<size_t>(group->size()))
      options.indices->push_back(missing[i]);
    to_write = static_cast<int64_t>(options.indices->size());
  }
  pipeline::PipelineSettings settings;
  settings.device = device;
  settings.dtype = pipeline::resolve_dtype(config.class_images.prior_generation_precision, device);
  settings.variant = config.variant;
  settings.single_file = config.single_file;
  settings.fused_group_norm_silu = config.compute.fused_group_norm_silu;
  settings.channels_last = config.compute.channels_last;
  log::info(log::str("prior preservation: generating ", plan.class_images_to_generate,
                     " class images of \"", config.class_images.class_prompt, "\" in ",
                     config.class_images.class_data_dir));
  Progress progress("class images", to_write, 0, 30.0);
  auto on_progress = [&](const pipeline::ClassImageProgress& p) {
    progress.update(p.written, "step " + std::to_string(p.step) + "/" + std::to_string(p.steps));
    if (const int signal = InterruptWatch::pending()) {
      // Every image written so far is complete; the next run generates only the rest.
      progress.finish();
      throw Error(exit_code_for_signal(signal),
                  log::str("interrupted while generating class images (", p.written,
                           " written); run again to generate the rest and train"));
    }
  };
  pipeline::generate_class_images(base, settings, options, on_progress);
  progress.finish();  // generate_class_images released the sampler's GPU memory
  if (group) group->barrier();  // every share written
}

std::vector<PipelineModule> TrainingModels::pipeline_modules() const {
  return {{"unet", "diffusion_pytorch_model", unet.ptr(), {}},
          {"text_encoder", "model", text_encoder.ptr(), models::map_text_encoder_key},
          {"vae", "diffusion_pytorch_model", vae.ptr(), {}}};
}

namespace {

// train_dreambooth_lora.py: adapters on the UNet's attention projections (here
// lora_unet_targets) and, with train_text_encoder, on the text encoder's; initialised from a
// generator of their own seeded with `seed`, so the run's other draws (data order, noise,
// timesteps) are those of a full run with the same seed.
void attach_training_adapters(TrainingModels& models, const TrainConfig& config) {
  const models::LoRAOptions options{config.lora.lora_rank, config.lora.alpha(),
                                    config.lora.lora_dropout};
  auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(config.seed));
  const int64_t unet =
      models::attach_adapters(*models.unet, config.lora.lora_unet_targets, options, generator);
  int64_t text = 0;
  if (config.train_text_encoder) {
    text = models::attach_adapters(*models.text_encoder, models::text_encoder_adapter_targets(),
                                   options, generator);
  }
  log::info(
      log::str("LoRA rank ", options.rank, ", alpha ", options.alpha, ": ", unet, " UNet adapters",
               config.train_text_encoder ? log::str(", ", text, " text-encoder adapters") : ""));
}

}  // namespace

TrainingModels load_training_models(const io::ModelFolder& base, const TrainConfig& config,
                                    torch::Device device, Precision precision) {
  // train_dreambooth.py keeps the trained models in fp32 (master weights) and casts the frozen
  // VAE and text encoder to the mixed-precision dtype; on the CPU everything stays fp32. In a
  // LoRA run the base weights are all frozen, so all take the mixed-precision dtype and only
  // the adapters are fp32 (train_dreambooth_lora.py's cast_training_params).
  const c10::ScalarType frozen = device.is_cuda() ? compute_dtype(precision) : torch::kFloat;
  const bool lora = config.lora.train_mode == TrainMode::lora;
  const std::string& variant = config.variant;
  log::info("loading " + base.source().string() +
            (variant.empty() ? "" : " (variant " + variant + ")"));
  const auto loading = std::chrono::steady_clock::now();
  // Lean mode (weight_dtype bf16) keeps the fully trained weights themselves in bf16.
  const c10::ScalarType trained =
      config.compute.weight_dtype == Precision::bf16 ? torch::kBFloat16 : torch::kFloat;
  const c10::ScalarType text_dtype = config.train_text_encoder && !lora ? trained : frozen;
  const c10::ScalarType unet_dtype = lora ? frozen : trained;
  // The small parts first, so that a fault in them is reported before the weights load.
  auto tokenizer = text::CLIPTokenizer::from_folder(base.require("tokenizer").dir);
  schedulers::NoiseSchedule schedule(schedulers::SchedulerConfig::from_json(
      base.config("scheduler"), base.config_path("scheduler").string()));
  models::LoadedComponents loaded = models::load_components(
      base, {{text_dtype, device}, {unet_dtype, device}, {frozen, device}, variant});
  TrainingModels models{std::move(tokenizer),  std::move(loaded.text_encoder),
                        std::move(loaded.vae), std::move(loaded.unet),
                        std::move(schedule),   frozen};
  synchronize_device(device);
  // tools/benchmark.py reads this line (the load time it reports).
  log::info(log::str("models loaded in ", format_number(seconds_since(loading), 3), " s"));
  if (lora) attach_training_adapters(models, config);
  if (config.compute.gradient_checkpointing) {
    models.unet->set_gradient_checkpointing(true);
    if (config.train_text_encoder) models.text_encoder->set_gradient_checkpointing(true);
  }
  if (config.compute.fused_group_norm_silu) {
    const int64_t fused = models::set_fused_group_norm_silu(*models.unet, true) +
                          models::set_fused_group_norm_silu(*models.vae, true);
    log::info(log::str("fused_group_norm_silu: ", fused,
                       " GroupNorms of the UNet and VAE fused (with the SiLU after them)"));
  }
  if (config.compute.channels_last) {
    // After the adapters, so that theirs are converted too; before the optimizer, whose states
    // follow each weight's storage order. The frozen VAE too: it encodes every step's images
    // unless latents are cached, and decodes the validation images.
    const int64_t unet = models::to_channels_last(*models.unet);
    const int64_t vae = models::to_channels_last(*models.vae);
    log::info(log::str("channels_last: ", unet, " UNet and ", vae,
                       " VAE convolution weights stored NHWC"));
  }
  if (config.compute.allow_tf32 && device.is_cuda()) {
    at::globalContext().setAllowTF32CuBLAS(true);
    at::globalContext().setAllowTF32CuDNN(true);
  }
  return models;
}

std::vector<std::string> move_cached_frozen_models(TrainingModels& models, const TrainConfig& config,
                                                   torch::Device device, bool to_host) {
  std::vector<std::string> moved;
  if (!device.is_cuda()) return moved;
  const torch::Device target = to_host ? torch::Device(torch::kCPU) : device;
  if (config.data.cache_latents) {
    models.vae->to(target);
    moved.push_back("vae");
  }
  if (!config.train_text_encoder) {
    models.text_encoder->to(target);
    moved.push_back("text_encoder");
  }
  return moved;
}

DreamBoothDataset load_dataset(const TrainingPlan& plan) {
  std::vector<fs::path> instance;
  for (const auto& image : plan.instance_images) instance.push_back(image.path);
  std::vector<fs::path> classes;
  if (plan.config.class_images.with_prior_preservation)
    classes = list_images(plan.config.class_images.class_data_dir);
  return DreamBoothDataset(instance, classes, preprocess_options(plan.config));
}

}  // namespace sdtrain::train
