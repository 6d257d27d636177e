#include "sdtrain/train/run_outputs.h"

#include <chrono>
#include <iomanip>
#include <sstream>

#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/io/image.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/lora_file.h"
#include "sdtrain/models/single_file.h"
#include "sdtrain/models/single_file_config.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/pipeline/stable_diffusion_pipeline.h"
#include "sdtrain/train/output_dir.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/kill_point.h"
#include "sdtrain/util/log.h"
#include "sdtrain/util/progress.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

constexpr const char* kConfigFile = "train_config.json";

c10::ScalarType save_dtype(const TrainConfig& config) {
  return config.outputs.save_dtype == Precision::fp16 ? torch::kHalf : torch::kFloat;
}

}  // namespace

RunOutputs::RunOutputs(const TrainingPlan& plan, const io::ModelFolder& base, bool overwrite,
                       bool is_main_process)
    : plan_(plan),
      config_(plan.config),
      base_(base),
      output_dir_(plan.config.outputs.output_dir),
      overwrite_(overwrite),
      main_(is_main_process) {}

void RunOutputs::take_output_dir() {
  if (!main_) return;
  lock_.emplace(output_dir_);  // held until the run ends; a second run into output_dir stops here
  for (const auto& leftover : remove_leftovers(output_dir_)) {
    log::info("removed " + leftover.string() + " (left by a run that was killed)");
  }
  prepare_output_dir(config_, overwrite_);
  write_file_atomically(output_dir_ / kConfigFile, config_.to_json().dump(2) + "\n");
}

void RunOutputs::start(int64_t resumed_step, int64_t last_checkpoint_step) {
  last_checkpoint_step_ = last_checkpoint_step;
  if (!main_) return;
  // Records of steps after the resumed one (and a line torn by a kill) are dropped, so the
  // steps retrained now are not logged twice.
  const fs::path metrics = metrics_file(output_dir_);
  keep_metrics_up_to(metrics, resumed_step);
  metrics_.open(metrics, std::ios::app);
  if (!metrics_) throw OutputError("cannot write " + metrics.string());
  progress_ = std::make_unique<Progress>("train", plan_.total_steps, resumed_step);
}

void RunOutputs::record_step(const StepRecord& record, bool loss_scaling, bool on_gpu) {
  if (!main_) return;
  write_metrics(record);
  const UpdateResult& update = record.update;
  std::string fields =
      "loss " + format_number(record.loss, 4) + "  lr " + format_number(update.lr, 3);
  if (loss_scaling) fields += "  scale " + format_number(update.loss_scale, 6);
  if (update.skipped) fields += " (step skipped: inf/NaN)";
  if (on_gpu) fields += "  mem " + format_gib(record.peak_memory);
  progress_->update(record.step, fields);
}

void RunOutputs::write_metrics(const StepRecord& record) {
  nlohmann::ordered_json line;
  line["step"] = record.step;
  line["epoch"] = record.epoch;
  line["loss"] = record.loss;
  line["lr"] = record.update.lr;
  line["grad_norm"] = record.update.grad_norm;
  line["loss_scale"] = record.update.loss_scale;
  line["skipped"] = record.update.skipped;
  line["seconds"] = record.seconds;
  line["peak_memory_bytes"] = record.peak_memory;
  line["peak_reserved_bytes"] = record.peak_reserved;
  const std::string text = line.dump() + "\n";
  if (kill_point_due("metrics-line")) {
    metrics_ << text.substr(0, text.size() / 2) << std::flush;
    kill_now();
  }
  metrics_ << text;
  metrics_.flush();
  if (!metrics_) {
    throw OutputError(
        "cannot write " + metrics_file(output_dir_).string() +
        " (is the disk full?); resume with \"resume_from_checkpoint\": \"latest\" once "
        "there is room");
  }
}

void RunOutputs::note(const std::string& message) {
  if (!main_) return;
  progress_ ? progress_->note(message) : log::info(message);
}

void RunOutputs::finish_progress() {
  if (progress_) progress_->finish();
  progress_.reset();
}

void RunOutputs::save_checkpoint(const TrainerState& state, const CheckpointContents& contents) {
  if (!main_) {
    last_checkpoint_step_ = state.global_step;
    return;
  }
  const auto started = std::chrono::steady_clock::now();
  const fs::path path = write_checkpoint_folder(output_dir_, state, [&](const fs::path& dir) {
    contents.trained.save(dir, base_);
    if (contents.ema) {
      fs::create_directories(dir / kCheckpointEmaDir);
      copy_file_atomically(base_.config_path("unet"), dir / kCheckpointEmaDir / "config.json");
      contents.ema->save(dir / kCheckpointEmaDir / "diffusion_pytorch_model.safetensors");
    }
    io::NamedTensors optimizer_tensors;
    std::map<std::string, std::string> metadata;
    contents.optimizer.save_state(optimizer_tensors, metadata);
    io::save_safetensors(dir / kCheckpointOptimizerFile, optimizer_tensors, metadata);
  });
  last_checkpoint_step_ = state.global_step;
  if (config_.outputs.checkpoints_total_limit)
    prune_checkpoints(output_dir_, *config_.outputs.checkpoints_total_limit);
  note("saved " + path.string() + " in " + format_number(seconds_since(started), 3) + " s");
}

std::string RunOutputs::last_checkpoint_hint() const {
  if (last_checkpoint_step_ < 0) return "";
  const fs::path last = output_dir_ / ("checkpoint-" + std::to_string(last_checkpoint_step_));
  return " The last good checkpoint is " + last.string() + ".";
}

bool RunOutputs::validates_at(int64_t step) const {
  const int64_t every = config_.outputs.validation_steps;
  return main_ && !config_.outputs.validation_prompts.empty() && every > 0 && step % every == 0;
}

void RunOutputs::sample_validation_images(int64_t step, TrainingModels& models,
                                          const TrainedSet& trained, EMAModel* ema,
                                          Precision precision) {
  if (!validates_at(step)) return;
  const auto started = std::chrono::steady_clock::now();
  const io::NamedTensors averaged = trained.component_parameters("unet");
  if (ema) {
    ema->store(averaged);
    ema->copy_to(averaged);
  }
  pipeline::PipelineSettings settings;
  settings.device = models.unet->parameters().front().device();
  settings.dtype = torch::kFloat;
  pipeline::StableDiffusionPipeline sampler(models.tokenizer, models.text_encoder, models.unet,
                                            models.vae, models.schedule.config(), settings);
  pipeline::GenerationOptions options;
  for (const auto& prompt : config_.outputs.validation_prompts) {
    for (int i = 0; i < config_.outputs.num_validation_images; ++i)
      options.prompts.push_back(prompt);
  }
  options.num_images = static_cast<int64_t>(options.prompts.size());
  options.batch_size = config_.outputs.num_validation_images;
  // Decoded one image at a time: at full resolution the VAE decode is the sampling's largest
  // transient memory, and here it comes on top of the training state (docs/memory.md).
  // diffusers' train_dreambooth.py calls its pipeline once per validation image.
  options.decode_batch_size = 1;
  options.steps = 25;
  options.scheduler = "dpm++2m";
  options.seed = config_.seed;
  options.width = options.height = config_.data.resolution;
  std::vector<io::Image> images;
  {
    AutocastGuard autocast(settings.device.type(), precision);
    images = sampler.generate(options);
  }
  if (ema) ema->restore(averaged);
  const fs::path path = output_dir_ / "samples" / ("step-" + std::to_string(step) + ".png");
  fs::create_directories(path.parent_path());
  io::write_png(path, io::make_image_grid(images, config_.outputs.num_validation_images),
                {{"prompts", nlohmann::json(config_.outputs.validation_prompts).dump()},
                 {"step", std::to_string(step)},
                 {"sampler", "dpm++2m, 25 steps, guidance 7.5"},
                 {"seed", std::to_string(config_.seed)}});
  note("validation images: " + path.string() + " in " + format_number(seconds_since(started), 3) +
       " s");
}

void RunOutputs::export_model(const TrainedSet& trained, TrainingModels& models,
                              const EMAModel* ema) {
  if (!main_) return;
  if (ema) ema->copy_to(trained.component_parameters("unet"));
  if (trained.part() == TrainedPart::adapters) return export_adapters(models);
  const SaveFormat format = config_.outputs.save_format;
  // Every component, the untrained ones read from the base once: a single file holds them all,
  // and a single-file base has no component files for the diffusers folder to copy.
  std::map<std::string, io::NamedTensors> components = trained.weights();
  if (format != SaveFormat::diffusers || base_.single_file())
    models::add_base_components(base_, config_.variant, components);
  if (format != SaveFormat::diffusers) export_single_file(components);
  if (format == SaveFormat::single_file) return;
  exporter::PipelineExport job;
  job.base = &base_;
  job.base_variant = config_.variant;
  job.dtype = save_dtype(config_);
  job.trained = base_.single_file() ? std::move(components) : trained.weights();
  exporter::export_pipeline(job, output_dir_);
  log::info("wrote the fine-tuned model to " + output_dir_.string() +
            " (StableDiffusionPipeline.from_pretrained)");
}

// `components`: the trained ones from the run, the others from the base files in float32 (not
// the copies in memory, which a GPU run holds in half precision), so an fp32 single file keeps
// their bits. A v-prediction model gets the .yaml A1111 needs beside it (docs/single_file.md).
void RunOutputs::export_single_file(const std::map<std::string, io::NamedTensors>& components) {
  const fs::path path = output_dir_ / kSingleFileName;
  const bool sidecar = models::write_single_file(
      path, base_, components, save_dtype(config_),
      {{"sdtrain_version", SDTRAIN_VERSION},
       {"sdtrain_base_model", config_.pretrained_model_name_or_path}});
  log::info("wrote the fine-tuned model as one file to " + path.string() +
            " (original LDM layout: AUTOMATIC1111, ComfyUI)" +
            (sidecar ? std::string(", with ") + kSingleFileSidecar + " (v-prediction)" : ""));
}

void RunOutputs::export_adapters(TrainingModels& models) {
  const auto& lora = config_.lora;
  std::map<std::string, models::ComponentAdapters> adapters;
  models::LoRAWriteOptions options;
  adapters["unet"] = models::attached_adapter_weights(*models.unet);
  options.components["unet"] = {lora.lora_rank, lora.alpha(), lora.lora_dropout,
                                lora.lora_unet_targets};
  if (config_.train_text_encoder) {
    adapters["text_encoder"] = models::attached_adapter_weights(*models.text_encoder);
    options.components["text_encoder"] = {lora.lora_rank, lora.alpha(), lora.lora_dropout,
                                          models::text_encoder_adapter_targets()};
  }
  options.metadata = {{"sdtrain_version", SDTRAIN_VERSION},
                      {"sdtrain_base_model", config_.pretrained_model_name_or_path},
                      {"sdtrain_instance_prompt", config_.data.instance_prompt},
                      {"sdtrain_lora_rank", std::to_string(lora.lora_rank)},
                      {"sdtrain_lora_alpha", format_number(lora.alpha())}};
  options.dtype = save_dtype(config_);
  for (const auto& format : lora.lora_formats) {
    const bool kohya = format == "kohya";
    const fs::path path = output_dir_ / (kohya ? kLoRAKohyaFile : kLoRAWeightsFile);
    kohya ? models::write_kohya_lora(path, adapters, options)
          : models::write_diffusers_lora(path, adapters, options);
    log::info("wrote the LoRA adapters to " + path.string() +
              (kohya ? " (kohya layout: AUTOMATIC1111, ComfyUI)"
                     : " (StableDiffusionPipeline.load_lora_weights)"));
  }
}

void RunOutputs::dump_trained_start(const fs::path& dump_dir, const TrainedSet& trained) {
  // A full run starts from the base weights, which the replay reads itself; adapters start
  // from a random draw, which the replay needs.
  if (dump_dir.empty() || trained.part() != TrainedPart::adapters) return;
  fs::create_directories(dump_dir);
  io::save_safetensors(dump_dir / "adapters-start.safetensors", trained.named_parameters());
}

void RunOutputs::dump_micro_batch(const fs::path& dump_dir, int64_t micro_index,
                                  const LossInputs& inputs, const LossOutput& output, bool sync) {
  if (dump_dir.empty()) return;
  fs::create_directories(dump_dir);
  auto host = [](const torch::Tensor& t) { return t.detach().to(torch::kCPU).contiguous(); };
  io::NamedTensors tensors = {{"latents", host(output.latents.to(torch::kFloat))},
                              {"noise", host(inputs.noise.to(torch::kFloat))},
                              {"timesteps", host(inputs.timesteps)},
                              {"loss", host(output.loss.to(torch::kFloat)).reshape({1})},
                              {"sync", torch::tensor({sync ? 1 : 0}, torch::kLong)}};
  std::ostringstream name;
  name << "micro-" << std::setw(5) << std::setfill('0') << micro_index << ".safetensors";
  io::save_safetensors(dump_dir / name.str(), tensors);
}

}  // namespace sdtrain::train
