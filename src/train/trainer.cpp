#include "sdtrain/train/trainer.h"

#include <chrono>
#include <csignal>
#include <cmath>
#include <fstream>
#include <iomanip>
#include <sstream>

#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/optim/optimizer.h"
#include "sdtrain/pipeline/class_images.h"
#include "sdtrain/pipeline/stable_diffusion_pipeline.h"
#include "sdtrain/schedulers/noise_schedule.h"
#include "sdtrain/text/clip_tokenizer.h"
#include "sdtrain/train/checkpoint.h"
#include "sdtrain/train/dataset.h"
#include "sdtrain/train/device_memory.h"
#include "sdtrain/train/ema.h"
#include "sdtrain/train/interrupt.h"
#include "sdtrain/train/lr_schedule.h"
#include "sdtrain/train/mixed_precision.h"
#include "sdtrain/train/output_dir.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/kill_point.h"
#include "sdtrain/util/log.h"
#include "sdtrain/util/output_lock.h"
#include "sdtrain/util/progress.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

constexpr const char* kConfigFile = "train_config.json";
constexpr const char* kOptimizerFile = "optimizer.safetensors";
constexpr const char* kEmaDir = "unet_ema";

// Keys that may change between a checkpoint and the run resuming it: how long to train and
// what to write along the way. Everything else changes the math, so a resume refuses it.
const std::vector<std::string>& resumable_differences() {
  static const std::vector<std::string> keys = {
      "epochs", "max_steps", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
      "resume_reset_epoch",
      "validation_prompts", "validation_steps", "num_validation_images", "save_dtype", "output_dir",
      "device", "sample_batch_size", "num_class_images", "prior_generation_precision",
      "prior_generation_scheduler", "prior_generation_steps", "prior_generation_guidance_scale"};
  return keys;
}

std::string format_bytes(int64_t bytes) {
  std::ostringstream out;
  out << std::fixed << std::setprecision(2) << static_cast<double>(bytes) / (1024.0 * 1024.0 * 1024.0) << " GiB";
  return out.str();
}

std::string format_number(double value, int precision = 4) {
  std::ostringstream out;
  out << std::setprecision(precision) << value;
  return out.str();
}

// One optimizer step's worth of numbers, for the progress line and metrics.jsonl.
struct StepRecord {
  int64_t step = 0;
  int64_t epoch = 0;
  double loss = 0;
  double lr = 0;
  double grad_norm = 0;
  double loss_scale = 1;
  bool skipped = false;
  double seconds = 0;
  int64_t peak_memory = 0;
};

class TrainingRun {
 public:
  TrainingRun(const TrainingPlan& plan, const TrainOptions& options)
      : plan_(plan),
        config_(plan.config),
        options_(options),
        device_(plan.device),
        precision_(parse_precision(config_.mixed_precision)),
        output_dir_(config_.output_dir),
        folder_(config_.pretrained_model_name_or_path),
        generator_(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(config_.seed))) {}

  TrainSummary run();

 private:
  void take_output_dir();
  void check_saved_position(TrainerState& saved, const fs::path& checkpoint) const;
  void generate_class_images();
  void validate_now();
  void load_models();
  void prepare_data();
  void precompute_text_embeddings();
  void cache_latents();
  void make_optimizer();
  void resume();
  void train_loop();
  struct MicroBatch {
    torch::Tensor loss;
    torch::Tensor latents;
    torch::Tensor noise;
    torch::Tensor timesteps;
  };
  MicroBatch micro_batch_loss(const std::vector<int64_t>& indices);
  torch::Tensor latents_for(const std::vector<int64_t>& indices, const torch::Tensor& pixels);
  torch::Tensor text_embeddings_for(int64_t batch);
  bool optimizer_step(StepRecord& record);
  double clip_gradients(const std::vector<torch::Tensor>& gradients);
  void save_checkpoint_now();
  void check_interrupt();
  void write_metrics(const StepRecord& record);
  void export_final_model();
  std::vector<torch::Tensor> trained_parameters() const;
  void dump_micro_batch(int64_t micro_index, const MicroBatch& batch, bool sync);

  const TrainingPlan& plan_;
  const TrainConfig& config_;
  TrainOptions options_;
  torch::Device device_;
  Precision precision_;
  fs::path output_dir_;
  io::ModelFolder folder_;
  at::Generator generator_;

  c10::ScalarType frozen_dtype_ = torch::kFloat;
  std::optional<text::CLIPTokenizer> tokenizer_;
  models::CLIPTextModel text_encoder_{nullptr};
  models::AutoencoderKL vae_{nullptr};
  models::UNet2DConditionModel unet_{nullptr};
  std::optional<schedulers::NoiseSchedule> schedule_;
  std::optional<DreamBoothDataset> dataset_;
  torch::Tensor instance_ids_;     // [1, 77]
  torch::Tensor class_ids_;        // [1, 77]
  torch::Tensor instance_embeds_;  // [1, 77, D] when the text encoder is frozen
  torch::Tensor class_embeds_;
  struct CachedPosterior {
    torch::Tensor mean;
    torch::Tensor std;
  };
  std::vector<CachedPosterior> cached_instance_;  // per photo, with cache_latents
  std::vector<CachedPosterior> cached_class_;
  std::unique_ptr<optim::Optimizer> optimizer_;
  std::optional<LossScaler> scaler_;
  std::optional<EMAModel> ema_;
  LrScheduleOptions lr_options_;

  TrainerState state_;
  int64_t steps_this_run_ = 0;
  int64_t skipped_steps_ = 0;
  int64_t last_checkpoint_step_ = -1;
  std::unique_ptr<Progress> progress_;
  std::optional<OutputLock> lock_;
  std::ofstream metrics_;
};

void TrainingRun::take_output_dir() {
  lock_.emplace(output_dir_);  // held until the run ends; a second run into output_dir stops here
  for (const auto& leftover : remove_leftovers(output_dir_)) {
    log::info("removed " + leftover.string() + " (left by a run that was killed)");
  }
  prepare_output_dir(config_, options_.overwrite);
  write_file_atomically(output_dir_ / kConfigFile, config_.to_json().dump(2) + "\n");
}

void TrainingRun::generate_class_images() {
  if (!config_.with_prior_preservation || plan_.class_images_to_generate <= 0) return;
  // Before the training models load, as train_dreambooth.py: the sampler's memory is released
  // when this returns.
  pipeline::ClassImageOptions options;
  options.class_data_dir = config_.class_data_dir;
  options.class_prompt = config_.class_prompt;
  options.num_class_images = config_.num_class_images;
  options.sample_batch_size = config_.sample_batch_size;
  options.scheduler = config_.prior_generation_scheduler;
  options.steps = config_.prior_generation_steps;
  options.guidance_scale = config_.prior_generation_guidance_scale;
  options.seed = config_.seed;
  // At the training resolution: the dataset resizes to it anyway (diffusers samples at the
  // model's default size, 512 for SD 2.1-base, the same for the usual resolution).
  options.width = options.height = config_.resolution;
  pipeline::PipelineSettings settings;
  settings.device = device_;
  settings.dtype = pipeline::resolve_dtype(config_.prior_generation_precision, device_);
  settings.variant = config_.variant;
  log::info(log::str("prior preservation: generating ", plan_.class_images_to_generate, " class images of \"",
                     config_.class_prompt, "\" in ", config_.class_data_dir));
  Progress progress("class images", plan_.class_images_to_generate, 0, 30.0);
  pipeline::generate_class_images(folder_.root(), settings, options, [&](const pipeline::ClassImageProgress& p) {
    progress.update(p.written, "step " + std::to_string(p.step) + "/" + std::to_string(p.steps));
    if (const int signal = InterruptWatch::pending()) {
      // Every image written so far is complete; the next run generates only the rest.
      progress.finish();
      throw Error(exit_code_for_signal(signal), log::str("interrupted while generating class images (", p.written,
                           " written); run again to generate the rest and train"));
    }
  });
  progress.finish();  // generate_class_images released the sampler's GPU memory
}

void TrainingRun::validate_now() {
  if (config_.validation_prompts.empty() || config_.validation_steps <= 0) return;
  // diffusers' validation: DPM-Solver++ 2M, 25 steps, guidance 7.5, the run's seed, under
  // autocast; the modules are the training ones (EMA weights swapped in with use_ema).
  if (ema_) {
    ema_->store(*unet_);
    ema_->copy_to(*unet_);
  }
  pipeline::PipelineSettings settings;
  settings.device = device_;
  settings.dtype = torch::kFloat;
  pipeline::StableDiffusionPipeline sampler(*tokenizer_, text_encoder_, unet_, vae_, schedule_->config(), settings);
  pipeline::GenerationOptions options;
  for (const auto& prompt : config_.validation_prompts) {
    for (int i = 0; i < config_.num_validation_images; ++i) options.prompts.push_back(prompt);
  }
  options.num_images = static_cast<int64_t>(options.prompts.size());
  options.batch_size = config_.num_validation_images;
  options.steps = 25;
  options.scheduler = "dpm++2m";
  options.seed = config_.seed;
  options.width = options.height = config_.resolution;
  std::vector<io::Image> images;
  {
    AutocastGuard autocast(device_.type(), precision_);
    images = sampler.generate(options);
  }
  if (ema_) ema_->restore(*unet_);
  const fs::path path = output_dir_ / "samples" / ("step-" + std::to_string(state_.global_step) + ".png");
  fs::create_directories(path.parent_path());
  io::write_png(path, io::make_image_grid(images, config_.num_validation_images),
                {{"prompts", nlohmann::json(config_.validation_prompts).dump()},
                 {"step", std::to_string(state_.global_step)},
                 {"sampler", "dpm++2m, 25 steps, guidance 7.5"},
                 {"seed", std::to_string(config_.seed)}});
  const std::string message = "validation images: " + path.string();
  progress_ ? progress_->note(message) : log::info(message);
}

void TrainingRun::load_models() {
  // train_dreambooth.py keeps the trained models in fp32 (master weights) and casts the frozen
  // VAE and text encoder to the mixed-precision dtype; on the CPU everything stays fp32.
  if (device_.is_cuda()) frozen_dtype_ = compute_dtype(precision_);
  const std::string& variant = config_.variant;
  log::info("loading " + folder_.root().string() + (variant.empty() ? "" : " (variant " + variant + ")"));
  tokenizer_ = text::CLIPTokenizer::from_folder(folder_.require("tokenizer").dir);
  const c10::ScalarType text_dtype = config_.train_text_encoder ? torch::kFloat : frozen_dtype_;
  text_encoder_ = models::load_text_encoder(folder_, {text_dtype, device_}, variant);
  vae_ = models::load_vae(folder_, {frozen_dtype_, device_}, variant);
  unet_ = models::load_unet(folder_, {torch::kFloat, device_}, variant);
  schedule_.emplace(schedulers::SchedulerConfig::from_json(folder_.config("scheduler"),
                                                          folder_.config_path("scheduler").string()));
  vae_->eval();
  for (auto& parameter : vae_->parameters()) parameter.set_requires_grad(false);
  text_encoder_->train(config_.train_text_encoder);
  for (auto& parameter : text_encoder_->parameters()) parameter.set_requires_grad(config_.train_text_encoder);
  unet_->train();
  if (config_.gradient_checkpointing) {
    unet_->set_gradient_checkpointing(true);
    if (config_.train_text_encoder) text_encoder_->set_gradient_checkpointing(true);
  }
  if (config_.allow_tf32 && device_.is_cuda()) {
    at::globalContext().setAllowTF32CuBLAS(true);
    at::globalContext().setAllowTF32CuDNN(true);
  }
}

void TrainingRun::prepare_data() {
  std::vector<fs::path> instance;
  for (const auto& image : plan_.instance_images) instance.push_back(image.path);
  std::vector<fs::path> classes;
  if (config_.with_prior_preservation) classes = list_images(config_.class_data_dir);
  dataset_.emplace(instance, classes, preprocess_options(config_));
  state_.dataset = {dataset_->num_instance_images(), dataset_->num_class_images(),
                    (dataset_->size() + config_.train_batch_size - 1) / config_.train_batch_size};
  instance_ids_ = tokenizer_->encode_batch({config_.instance_prompt});
  if (config_.with_prior_preservation) class_ids_ = tokenizer_->encode_batch({config_.class_prompt});
}

void TrainingRun::precompute_text_embeddings() {
  if (config_.train_text_encoder) return;
  // The frozen text encoder maps each prompt to the same embedding every step: compute the
  // two embeddings once instead of once per step (diffusers' --pre_compute_text_embeddings).
  torch::NoGradGuard no_grad;
  instance_embeds_ = text_encoder_->forward(instance_ids_.to(device_));
  if (class_ids_.defined()) class_embeds_ = text_encoder_->forward(class_ids_.to(device_));
}

void TrainingRun::cache_latents() {
  if (!config_.cache_latents) return;
  if (!config_.center_crop || config_.random_flip) {
    log::warn("cache_latents: each image is encoded once, so its crop and flip are fixed for the whole run");
  }
  torch::NoGradGuard no_grad;
  auto encode = [&](const torch::Tensor& resized, std::vector<CachedPosterior>& cache) {
    const torch::Tensor pixels = augment(resized, dataset_->options(), generator_).unsqueeze(0);
    auto posterior = vae_->encode(pixels.to(device_, frozen_dtype_));
    cache.push_back({posterior.mean, posterior.std});
  };
  for (int64_t i = 0; i < dataset_->num_instance_images(); ++i) encode(dataset_->resized_instance(i), cached_instance_);
  for (int64_t i = 0; i < dataset_->num_class_images(); ++i) encode(dataset_->resized_class(i), cached_class_);
  log::info(log::str("cache_latents: encoded ", cached_instance_.size() + cached_class_.size(), " images once"));
}

void TrainingRun::make_optimizer() {
  optim::NamedParameters parameters;
  for (const auto& item : unet_->named_parameters()) parameters.emplace_back("unet." + item.key(), item.value());
  if (config_.train_text_encoder) {
    for (const auto& item : text_encoder_->named_parameters()) {
      parameters.emplace_back("text_encoder." + item.key(), item.value());
    }
  }
  lr_options_ = lr_schedule_options(config_, plan_.total_steps);
  validate(lr_options_);
  optim::OptimizerOptions options;
  options.lr = lr_options_.learning_rate;
  options.beta1 = config_.adam_beta1;
  options.beta2 = config_.adam_beta2;
  options.eps = config_.adam_epsilon;
  options.weight_decay = config_.adam_weight_decay;
  optimizer_ = optim::make_optimizer(config_.resolved_optimizer(), std::move(parameters), options);
  scaler_.emplace(precision_ == Precision::fp16, device_);
  if (config_.use_ema) {
    EMAOptions ema_options;
    ema_options.decay = config_.ema_decay;
    // The shadow weights stay on the CPU: 4 bytes per UNet parameter out of GPU memory.
    ema_.emplace(*unet_, ema_options, torch::kCPU);
  }
  log::info(log::str("optimizer ", optimizer_->name(), ": ", optimizer_->num_parameters(), " tensors, state ",
                     format_bytes(optimizer_->state_bytes())));
}

std::vector<torch::Tensor> TrainingRun::trained_parameters() const {
  std::vector<torch::Tensor> parameters;
  for (const auto& [name, parameter] : optimizer_->parameters()) parameters.push_back(parameter);
  return parameters;
}

void TrainingRun::resume() {
  if (config_.resume_from_checkpoint.empty()) return;
  const auto checkpoint = resolve_checkpoint(output_dir_, config_.resume_from_checkpoint);
  if (!checkpoint) {
    // prepare_output_dir refused a folder holding model files, so nothing is lost here.
    log::info("resume_from_checkpoint \"latest\": no checkpoint in " + output_dir_.string() + ", starting afresh");
    return;
  }
  TrainerState saved = read_trainer_state(*checkpoint);
  check_saved_position(saved, *checkpoint);
  const nlohmann::ordered_json current = config_.to_json();
  std::string differences;
  for (const auto& [key, value] : current.items()) {
    const bool allowed = std::find(resumable_differences().begin(), resumable_differences().end(), key) !=
                         resumable_differences().end();
    if (!allowed && saved.config.contains(key) && saved.config[key] != value) {
      differences += "\n  " + key + ": checkpoint " + saved.config[key].dump() + ", now " + value.dump();
    }
  }
  if (!differences.empty()) {
    throw ConfigError("cannot resume from " + checkpoint->string() +
                      ": these settings differ from the run that wrote it:" + differences +
                      "\nrestore them, or start a new run in another output_dir");
  }
  log::info(log::str("resuming from ", checkpoint->string(), " (step ", saved.global_step, ")"));
  models::LoadOptions fp32{torch::kFloat, device_};
  models::load_state_dict(*unet_, io::find_weight_files(*checkpoint / "unet", "diffusion_pytorch_model"), fp32);
  if (config_.train_text_encoder) {
    models::load_state_dict(*text_encoder_, io::find_weight_files(*checkpoint / "text_encoder", "model"), fp32,
                            models::map_text_encoder_key);
  }
  optimizer_->load_state(io::SafetensorsFile(*checkpoint / kOptimizerFile));
  if (ema_) ema_->load(*checkpoint / kEmaDir / "diffusion_pytorch_model.safetensors");
  scaler_->set_state(saved.loss_scale, saved.loss_scale_growth_tracker);
  try {
    generator_.set_state(saved.rng_state);
  } catch (const c10::Error&) {
    throw ModelError((*checkpoint / "random_states.safetensors").string() +
                     ": \"cpu_generator\" is not a CPU generator state; resume from another checkpoint");
  }
  const TrainerState::Dataset dataset = state_.dataset;
  state_ = saved;
  state_.config = current;
  state_.dataset = dataset;
  last_checkpoint_step_ = saved.global_step;
}

void TrainingRun::check_saved_position(TrainerState& saved, const fs::path& checkpoint) const {
  // The saved position counts micro-batches of the data as it was; photos added or removed
  // since make it point elsewhere, or past the end of the epoch.
  const TrainerState::Dataset& now = state_.dataset;
  const bool recorded = saved.dataset.instance_images >= 0;
  const bool changed = recorded ? saved.dataset.instance_images != now.instance_images ||
                                      saved.dataset.class_images != now.class_images ||
                                      saved.dataset.batches_per_epoch != now.batches_per_epoch
                                : saved.batch_in_epoch > now.batches_per_epoch;
  if (!changed) return;
  const std::string what =
      recorded ? log::str(saved.dataset.instance_images, " photos and ", saved.dataset.class_images, " class images then, ",
                          now.instance_images, " and ", now.class_images, " now")
               : log::str("it stopped at micro-batch ", saved.batch_in_epoch, " of an epoch that now has ",
                          now.batches_per_epoch);
  if (!config_.resume_reset_epoch) {
    throw InputDataError("cannot resume from " + checkpoint.string() + ": the training images changed since it was written (" +
                         what + "). Restore them, or set \"resume_reset_epoch\": true (--set resume_reset_epoch=true) "
                         "to continue at the start of the next epoch with the same step count");
  }
  log::warn("resume_reset_epoch: the training images changed (" + what + "); continuing at the start of epoch " +
            std::to_string(saved.epoch + (saved.batch_in_epoch > 0 ? 1 : 0)));
  if (saved.batch_in_epoch > 0) saved.epoch += 1;
  saved.batch_in_epoch = 0;
}

torch::Tensor TrainingRun::latents_for(const std::vector<int64_t>& indices, const torch::Tensor& pixels) {
  torch::NoGradGuard no_grad;
  torch::Tensor latents;
  if (config_.cache_latents) {
    // Sample i pairs photo i mod n with class image i mod m (the dataset's pairing).
    std::vector<torch::Tensor> means, stds;
    auto add = [&](const CachedPosterior& cached) {
      means.push_back(cached.mean);
      stds.push_back(cached.std);
    };
    for (int64_t i : indices) add(cached_instance_[i % cached_instance_.size()]);
    if (config_.with_prior_preservation) {
      for (int64_t i : indices) add(cached_class_[i % cached_class_.size()]);
    }
    const torch::Tensor mean = torch::cat(means);
    const torch::Tensor noise = at::randn(mean.sizes(), generator_, mean.options().device(torch::kCPU)).to(device_);
    latents = mean + torch::cat(stds) * noise;
  } else {
    latents = vae_->encode(pixels.to(device_, frozen_dtype_)).sample(generator_);
  }
  return latents * vae_->config().scaling_factor;
}

torch::Tensor TrainingRun::text_embeddings_for(int64_t batch) {
  // Instance prompts for the first half, class prompts for the second (diffusers' collate).
  if (config_.train_text_encoder) {
    torch::Tensor ids = instance_ids_.expand({batch, -1});
    if (config_.with_prior_preservation) ids = torch::cat({ids, class_ids_.expand({batch, -1})});
    return text_encoder_->forward(ids.to(device_));
  }
  torch::Tensor embeds = instance_embeds_.expand({batch, -1, -1});
  if (config_.with_prior_preservation) embeds = torch::cat({embeds, class_embeds_.expand({batch, -1, -1})});
  return embeds;
}

TrainingRun::MicroBatch TrainingRun::micro_batch_loss(const std::vector<int64_t>& indices) {
  // Random draws, in this order, all from the run's one CPU generator (checkpointed, so a
  // resumed run draws the same numbers): crops/flips, posterior sample, noise, offset noise,
  // timesteps.
  // With cache_latents the crops and flips were drawn once, when the latents were cached.
  const torch::Tensor pixels = config_.cache_latents ? torch::Tensor() : dataset_->batch(indices, generator_);
  const torch::Tensor latents = latents_for(indices, pixels);
  const auto cpu = latents.options().device(torch::kCPU);
  torch::Tensor noise = at::randn(latents.sizes(), generator_, cpu).to(device_);
  if (config_.offset_noise) {
    // diffusers' offset noise: 0.1 × N(0,1) per sample and channel.
    noise = noise + 0.1 * at::randn({latents.size(0), latents.size(1), 1, 1}, generator_, cpu).to(device_);
  }
  const torch::Tensor timesteps =
      at::randint(0, schedule_->num_train_timesteps(), {latents.size(0)}, generator_,
                  torch::TensorOptions().dtype(torch::kLong)).to(device_);
  const torch::Tensor noisy = schedule_->add_noise(latents, noise, timesteps);
  const torch::Tensor target = schedule_->training_target(latents, noise, timesteps);

  torch::Tensor prediction;
  {
    AutocastGuard autocast(device_.type(), precision_);
    const torch::Tensor embeds = text_embeddings_for(static_cast<int64_t>(indices.size()));
    prediction = unet_->forward(noisy, timesteps, embeds);
  }
  torch::Tensor instance_prediction = prediction.to(torch::kFloat);
  torch::Tensor instance_target = target.to(torch::kFloat);
  torch::Tensor instance_timesteps = timesteps;
  torch::Tensor prior_loss;
  if (config_.with_prior_preservation) {
    auto predictions = instance_prediction.chunk(2, 0);
    auto targets = instance_target.chunk(2, 0);
    instance_prediction = predictions[0];
    instance_target = targets[0];
    instance_timesteps = timesteps.chunk(2, 0)[0];
    prior_loss = torch::mse_loss(predictions[1], targets[1]);
  }
  torch::Tensor loss;
  if (config_.snr_gamma) {
    // Min-SNR-γ (Hang et al. 2023) as diffusers weights it, on the instance half only: the
    // SNR of the instance timesteps (diffusers uses all timesteps there, a known bug).
    const torch::Tensor snr = schedule_->snr(instance_timesteps);
    torch::Tensor weights = torch::clamp_max(snr, *config_.snr_gamma);
    weights = schedule_->prediction_type() == schedulers::PredictionType::v_prediction ? weights / (snr + 1)
                                                                                         : weights / snr;
    torch::Tensor per_sample = torch::mse_loss(instance_prediction, instance_target, at::Reduction::None)
                                   .mean(std::vector<int64_t>{1, 2, 3});
    loss = (per_sample * weights.to(per_sample.device())).mean();
  } else {
    loss = torch::mse_loss(instance_prediction, instance_target);
  }
  if (prior_loss.defined()) loss = loss + config_.prior_loss_weight * prior_loss;
  return {loss, latents, noise, timesteps};
}

void TrainingRun::dump_micro_batch(int64_t micro_index, const MicroBatch& batch, bool sync) {
  fs::create_directories(options_.dump_dir);
  io::NamedTensors tensors = {{"latents", batch.latents.detach().to(torch::kCPU, torch::kFloat).contiguous()},
                              {"noise", batch.noise.to(torch::kCPU, torch::kFloat).contiguous()},
                              {"timesteps", batch.timesteps.to(torch::kCPU).contiguous()},
                              {"loss", batch.loss.detach().to(torch::kCPU, torch::kFloat).reshape({1})},
                              {"sync", torch::tensor({sync ? 1 : 0}, torch::kLong)}};
  std::ostringstream name;
  name << "micro-" << std::setw(5) << std::setfill('0') << micro_index << ".safetensors";
  io::save_safetensors(options_.dump_dir / name.str(), tensors);
}

double TrainingRun::clip_gradients(const std::vector<torch::Tensor>& gradients) {
  // torch.nn.utils.clip_grad_norm_: the 2-norm of the per-tensor 2-norms, and every gradient
  // scaled by min(1, max_norm / (norm + 1e-6)).
  std::vector<torch::Tensor> norms;
  for (const auto& grad : gradients) {
    if (grad.defined()) norms.push_back(torch::linalg_vector_norm(grad, 2, c10::nullopt, false, c10::nullopt));
  }
  if (norms.empty()) return 0.0;
  const torch::Tensor total = torch::linalg_vector_norm(torch::stack(norms), 2, c10::nullopt, false, c10::nullopt);
  if (config_.max_grad_norm > 0) {
    const torch::Tensor coefficient = torch::clamp_max(config_.max_grad_norm / (total + 1e-6), 1.0);
    for (const auto& grad : gradients) {
      if (grad.defined()) grad.mul_(coefficient.to(grad.device(), grad.scalar_type()));
    }
  }
  return total.item<double>();
}

bool TrainingRun::optimizer_step(StepRecord& record) {
  std::vector<torch::Tensor> gradients;
  for (const auto& parameter : trained_parameters()) gradients.push_back(parameter.grad());
  const bool finite = scaler_->unscale_and_check(gradients);
  record.lr = learning_rate_at(lr_options_, state_.global_step);
  record.loss_scale = scaler_->scale_value();
  if (finite) {
    record.grad_norm = clip_gradients(gradients);
    optimizer_->set_lr(record.lr);
    optimizer_->step();
    if (ema_) ema_->step(*unet_);
  } else if (!scaler_->enabled()) {
    const std::string last = last_checkpoint_step_ >= 0
                                 ? " The last good checkpoint is " +
                                       (output_dir_ / ("checkpoint-" + std::to_string(last_checkpoint_step_))).string() +
                                       "."
                                 : "";
    throw Error(ExitCode::training_diverged,
                log::str("the gradients became inf/NaN at step ", state_.global_step + 1, " (", to_string(precision_),
                         "): training diverged. Lower learning_rate, keep max_grad_norm at 1.0, or use "
                         "mixed_precision bf16/no.") +
                    last);
  } else {
    record.skipped = true;
    ++skipped_steps_;
  }
  scaler_->update(!finite);
  optimizer_->zero_grad(true);
  return finite;
}

void TrainingRun::save_checkpoint_now() {
  state_.loss_scale = scaler_->scale_value();
  state_.loss_scale_growth_tracker = scaler_->growth_tracker();
  state_.rng_state = generator_.get_state();
  state_.config = config_.to_json();
  const fs::path path = save_checkpoint(output_dir_, state_, [&](const fs::path& dir) {
    exporter::write_model_component(dir / "unet", folder_.config_path("unet"), models::state_dict(*unet_),
                                    "diffusion_pytorch_model.safetensors");
    if (config_.train_text_encoder) {
      exporter::write_model_component(dir / "text_encoder", folder_.config_path("text_encoder"),
                                      models::state_dict(*text_encoder_), "model.safetensors");
    }
    if (ema_) {
      fs::create_directories(dir / kEmaDir);
      copy_file_atomically(folder_.config_path("unet"), dir / kEmaDir / "config.json");
      ema_->save(dir / kEmaDir / "diffusion_pytorch_model.safetensors");
    }
    io::NamedTensors optimizer_tensors;
    std::map<std::string, std::string> metadata;
    optimizer_->save_state(optimizer_tensors, metadata);
    io::save_safetensors(dir / kOptimizerFile, optimizer_tensors, metadata);
  });
  last_checkpoint_step_ = state_.global_step;
  if (config_.checkpoints_total_limit) prune_checkpoints(output_dir_, *config_.checkpoints_total_limit);
  const std::string message = "saved " + path.string();
  progress_ ? progress_->note(message) : log::info(message);
}

void TrainingRun::check_interrupt() {
  const int signal = InterruptWatch::pending();
  if (signal == 0) return;
  // Nothing to save before the first step: the same command simply starts again.
  if (state_.global_step > 0 && last_checkpoint_step_ != state_.global_step) save_checkpoint_now();
  if (progress_) progress_->finish();
  throw Error(exit_code_for_signal(signal), log::str("interrupted at step ", state_.global_step, "/", plan_.total_steps,
                       "; resume with \"resume_from_checkpoint\": \"latest\" (or --set resume_from_checkpoint=latest)"));
}

void TrainingRun::write_metrics(const StepRecord& record) {
  nlohmann::ordered_json line;
  line["step"] = record.step;
  line["epoch"] = record.epoch;
  line["loss"] = record.loss;
  line["lr"] = record.lr;
  line["grad_norm"] = record.grad_norm;
  line["loss_scale"] = record.loss_scale;
  line["skipped"] = record.skipped;
  line["seconds"] = record.seconds;
  line["peak_memory_bytes"] = record.peak_memory;
  const std::string text = line.dump() + "\n";
  if (kill_point_due("metrics-line")) {
    metrics_ << text.substr(0, text.size() / 2) << std::flush;
    kill_now();
  }
  metrics_ << text;
  metrics_.flush();
  if (!metrics_) {
    throw OutputError("cannot write " + metrics_file(output_dir_).string() +
                      " (is the disk full?); resume with \"resume_from_checkpoint\": \"latest\" once there is room");
  }
}

void TrainingRun::train_loop() {
  const int64_t batch_size = config_.train_batch_size;
  const int64_t accumulation = config_.gradient_accumulation_steps;
  const int64_t batches_per_epoch = state_.dataset.batches_per_epoch;  // set by prepare_data
  int64_t micro_index = 0;
  torch::Tensor window_loss = torch::zeros({}, torch::kDouble);
  int64_t window_count = 0;
  auto step_started = std::chrono::steady_clock::now();
  while (state_.global_step < plan_.total_steps) {
    // Every pass starts at a step boundary (an epoch's last micro-batch always steps), so an
    // interrupt is honoured here even when a pass trains nothing.
    check_interrupt();
    if (state_.batch_in_epoch >= batches_per_epoch) {
      state_.epoch += 1;
      state_.batch_in_epoch = 0;
    }
    const std::vector<int64_t> order = dataset_->epoch_order(config_.seed, state_.epoch);
    for (int64_t b = state_.batch_in_epoch; b < batches_per_epoch && state_.global_step < plan_.total_steps; ++b) {
      const auto first = order.begin() + b * batch_size;
      const std::vector<int64_t> indices(first, first + std::min<int64_t>(batch_size, dataset_->size() - b * batch_size));
      MicroBatch micro = micro_batch_loss(indices);
      // accelerate divides the loss by the accumulation steps before backward.
      scaler_->scale(micro.loss / static_cast<double>(accumulation)).backward();
      window_loss += micro.loss.detach().to(torch::kCPU, torch::kDouble);
      ++window_count;
      state_.batch_in_epoch = b + 1;
      // As accelerate: step every `accumulation` micro-batches and at the end of the epoch.
      const bool sync = window_count == accumulation || b + 1 == batches_per_epoch;
      if (!options_.dump_dir.empty()) dump_micro_batch(micro_index++, micro, sync);
      if (!sync) continue;
      StepRecord record;
      record.epoch = state_.epoch;
      record.loss = window_loss.item<double>() / window_count;
      optimizer_step(record);
      state_.global_step += 1;
      kill_point("step");
      state_.last_loss = record.loss;
      ++steps_this_run_;
      if (!std::isfinite(record.loss) && !scaler_->enabled()) {
        throw Error(ExitCode::training_diverged, log::str("the loss is ", record.loss, " at step ", state_.global_step,
                                                          ": training diverged; lower learning_rate"));
      }
      record.step = state_.global_step;
      record.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - step_started).count();
      record.peak_memory = peak_device_memory_bytes(device_);
      step_started = std::chrono::steady_clock::now();
      window_loss.zero_();
      window_count = 0;
      write_metrics(record);
      std::string fields = "loss " + format_number(record.loss) + "  lr " + format_number(record.lr, 3);
      if (scaler_->enabled()) fields += "  scale " + format_number(record.loss_scale, 6);
      if (record.skipped) fields += " (step skipped: inf/NaN)";
      if (device_.is_cuda()) fields += "  mem " + format_bytes(record.peak_memory);
      progress_->update(state_.global_step, fields);
      if (state_.batch_in_epoch == batches_per_epoch) {
        state_.epoch += 1;
        state_.batch_in_epoch = 0;
      }
      if (config_.checkpointing_steps > 0 && state_.global_step % config_.checkpointing_steps == 0 &&
          state_.global_step < plan_.total_steps) {
        save_checkpoint_now();
      }
      if (config_.validation_steps > 0 && state_.global_step % config_.validation_steps == 0) validate_now();
      check_interrupt();
    }
  }
}

void TrainingRun::export_final_model() {
  exporter::PipelineExport job;
  job.base = &folder_;
  job.base_variant = config_.variant;
  job.dtype = config_.save_dtype == "fp16" ? torch::kHalf : (config_.save_dtype == "bf16" ? torch::kBFloat16 : torch::kFloat);
  if (ema_) {
    // As diffusers' EMA training scripts: the final UNet is the EMA average.
    ema_->copy_to(*unet_);
  }
  job.trained["unet"] = models::state_dict(*unet_);
  if (config_.train_text_encoder) job.trained["text_encoder"] = models::state_dict(*text_encoder_);
  exporter::export_pipeline(job, output_dir_);
  log::info("wrote the fine-tuned model to " + output_dir_.string() + " (StableDiffusionPipeline.from_pretrained)");
}

TrainSummary TrainingRun::run() {
  const auto started = std::chrono::steady_clock::now();
  InterruptWatch interrupts;
  take_output_dir();
  generate_class_images();
  load_models();
  prepare_data();
  precompute_text_embeddings();
  cache_latents();
  make_optimizer();
  resume();
  // Records of steps after the resumed one (and a line torn by a kill) are dropped, so the
  // steps retrained now are not logged twice.
  keep_metrics_up_to(metrics_file(output_dir_), state_.global_step);
  metrics_.open(metrics_file(output_dir_), std::ios::app);
  if (!metrics_) throw OutputError("cannot write " + metrics_file(output_dir_).string());
  reset_peak_device_memory(device_);
  progress_ = std::make_unique<Progress>("train", plan_.total_steps, state_.global_step);
  train_loop();
  progress_->finish();
  progress_.reset();
  export_final_model();
  TrainSummary summary;
  summary.steps = state_.global_step;
  summary.steps_this_run = steps_this_run_;
  summary.skipped_steps = skipped_steps_;
  summary.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  summary.final_loss = state_.last_loss;
  summary.output_dir = output_dir_;
  return summary;
}

}  // namespace

TrainSummary run_training(const TrainingPlan& plan, const TrainOptions& options) {
  TrainingRun run(plan, options);
  return run.run();
}

std::string format_summary(const TrainSummary& summary) {
  std::ostringstream out;
  out << "trained " << summary.steps << " steps (" << summary.steps_this_run << " in this run";
  if (summary.skipped_steps > 0) out << ", " << summary.skipped_steps << " skipped for inf/NaN gradients";
  out << ") in " << format_duration(summary.seconds) << "; final loss " << format_number(summary.final_loss)
      << "; model: " << summary.output_dir.string();
  return out.str();
}

}  // namespace sdtrain::train
