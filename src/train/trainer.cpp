#include "sdtrain/train/trainer.h"

#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <iomanip>
#include <sstream>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/attention_backend.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/checkpoint.h"
#include "sdtrain/train/device_memory.h"
#include "sdtrain/train/device_readback.h"
#include "sdtrain/train/diffusion_loss.h"
#include "sdtrain/train/distributed.h"
#include "sdtrain/train/ema.h"
#include "sdtrain/train/gradient_buckets.h"
#include "sdtrain/train/interrupt.h"
#include "sdtrain/train/lr_schedule.h"
#include "sdtrain/train/micro_batch_pass.h"
#include "sdtrain/train/run_outputs.h"
#include "sdtrain/train/run_setup.h"
#include "sdtrain/train/step_profiler.h"
#include "sdtrain/train/trained_set.h"
#include "sdtrain/train/update.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/kill_point.h"
#include "sdtrain/util/log.h"
#include "sdtrain/util/progress.h"

namespace fs = std::filesystem;

namespace sdtrain::train {

namespace {

using Clock = std::chrono::steady_clock;

// How long a process waits for the others in a collective: long enough for the main process's
// validation images and checkpoints (torch.distributed's default too).
constexpr std::chrono::minutes kCollectiveTimeout{30};

// Where the run is in its data: the epoch and the micro-batch next in it (both in the
// TrainerState, so checkpoints carry them), and that epoch's sample order. Batches are global:
// under data parallel every process takes the same one and keeps its share (BatchShard). With
// `even_batches` an epoch's short last batch is filled from the epoch's start, so every
// process has train_batch_size samples (accelerate's even_batches).
class EpochCursor {
 public:
  EpochCursor(const DreamBoothDataset& data, uint64_t seed, int64_t batch_size, bool even_batches,
              TrainerState& state)
      : data_(data), seed_(seed), batch_size_(batch_size), even_(even_batches), state_(state) {}

  // The sample indices of the next micro-batch, in the epoch's order; moves past it.
  std::vector<int64_t> next() {
    if (state_.batch_in_epoch >= state_.dataset.batches_per_epoch) start_next_epoch();
    if (order_epoch_ != state_.epoch) {
      order_ = data_.epoch_order(seed_, state_.epoch);
      order_epoch_ = state_.epoch;
    }
    const int64_t first = state_.batch_in_epoch * batch_size_;
    const int64_t count = std::min<int64_t>(batch_size_, data_.size() - first);
    state_.batch_in_epoch += 1;
    std::vector<int64_t> batch(order_.begin() + first, order_.begin() + first + count);
    for (int64_t i = 0; even_ && static_cast<int64_t>(batch.size()) < batch_size_; ++i)
      batch.push_back(order_[static_cast<size_t>(i % data_.size())]);
    return batch;
  }
  // The micro-batch just taken was its epoch's last.
  bool at_epoch_end() const { return state_.batch_in_epoch == state_.dataset.batches_per_epoch; }
  // After the step that ended an epoch: a checkpoint saved now resumes at the next one.
  void close_finished_epoch() {
    if (at_epoch_end()) start_next_epoch();
  }

 private:
  void start_next_epoch() {
    state_.epoch += 1;
    state_.batch_in_epoch = 0;
  }

  const DreamBoothDataset& data_;
  uint64_t seed_;
  int64_t batch_size_;
  bool even_;
  TrainerState& state_;
  std::vector<int64_t> order_;
  int64_t order_epoch_ = -1;
};

// This process's rows of a global batch's loss inputs: its train_batch_size instance rows and,
// with prior preservation, the same rows of the class half (the loss splits the halves).
class BatchShard {
 public:
  BatchShard(int rank, int world_size, bool prior_preservation)
      : rank_(rank), world_(world_size), halves_(prior_preservation) {}
  LossInputs take(const LossInputs& all) const {
    if (world_ == 1) return all;
    const int64_t half = halves_ ? all.rows() / 2 : all.rows();
    const int64_t rows = half / world_;
    return all.map([&](const torch::Tensor& tensor) {
      const torch::Tensor first = tensor.narrow(0, rank_ * rows, rows);
      return halves_ ? torch::cat({first, tensor.narrow(0, half + rank_ * rows, rows)}) : first;
    });
  }

 private:
  int64_t rank_, world_;
  bool halves_;
};

// The micro-batch losses since the last optimizer step, summed in float64 on the device; the
// mean stays there (the step reads it a forward pass later, with its other figures). Under
// data parallel the mean is over every process's losses (what one process with the global
// batch would log).
class LossWindow {
 public:
  void add(const torch::Tensor& loss) {
    const torch::Tensor value = loss.detach().to(torch::kDouble);
    sum_ = sum_.defined() ? sum_ + value : value;
    ++count_;
  }
  int64_t count() const { return count_; }
  // float32 [1] on the loss's device.
  torch::Tensor take_mean(ProcessGroup* group) {
    int64_t count = count_;
    if (group) {
      group->all_reduce_sum(sum_);
      count *= group->size();
    }
    const torch::Tensor mean = (sum_ / static_cast<double>(count)).to(torch::kFloat).reshape({1});
    sum_ = torch::Tensor();
    count_ = 0;
    return mean;
  }

 private:
  torch::Tensor sum_;
  int64_t count_ = 0;
};

class TrainingRun {
 public:
  TrainingRun(const TrainingPlan& plan, const TrainOptions& options)
      : plan_(plan),
        config_(plan.config),
        options_(options),
        device_(plan.device),
        precision_(config_.compute.mixed_precision),
        attention_(config_.compute.attention_backend),
        folder_(options.base ? *options.base
                             : models::open_base_model(config_.pretrained_model_name_or_path,
                                                       config_.single_file)),
        generator_(at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(config_.seed))),
        outputs_(plan, folder_, options.overwrite, plan.parallel.is_main()),
        profiler_(StepProfiler::from_environment(device_)) {
    models::forget_attention_kernels();  // the log reports this run's
  }

  TrainSummary run();

 private:
  void set_up();
  void set_up_loss();
  void set_up_update();
  void resume();
  void train_loop();
  void micro_batch(const std::vector<int64_t>& indices, bool ends_step);
  LossOutput run_pass(const LossInputs& inputs, bool ends_step);
  void use_eager_pass();
  void step();
  void settle_step();
  void check_loss(double loss, int64_t step) const;
  void save_checkpoint();
  int pending_signal();
  void check_interrupt();
  void check_same_data_everywhere();
  void wait_for_every_process() {
    if (group_) group_->barrier();
  }
  EMAModel* ema() { return ema_ ? &*ema_ : nullptr; }

  const TrainingPlan& plan_;
  const TrainConfig& config_;
  TrainOptions options_;
  torch::Device device_;
  Precision precision_;
  models::PreferredAttentionBackend attention_;  // class images, training and validation
  io::ModelFolder folder_;
  at::Generator generator_;  // every random draw of the run, in docs/training.md's order
  RunOutputs outputs_;
  StepProfiler profiler_;  // SDTRAIN_PROFILE only
  std::shared_ptr<ProcessGroup> group_;  // under torchrun only

  std::optional<TrainingModels> models_;
  std::optional<TrainedSet> trained_;
  std::optional<DreamBoothDataset> dataset_;
  std::optional<EpochCursor> cursor_;
  std::optional<BatchShard> shard_;
  std::optional<LossInputSampler> sampler_;
  std::optional<DiffusionLoss> loss_;
  std::optional<LossScaler> scaler_;
  std::optional<EMAModel> ema_;
  std::unique_ptr<UpdatePolicy> update_;
  std::unique_ptr<MicroBatchPass> pass_;

  TrainerState state_;
  LossWindow window_;
  // The step applied last, until settle_step records it: its record without the figures the
  // device computes, and its loss on the way to the host.
  std::optional<StepRecord> unsettled_;
  DeviceReadback loss_readback_;
  int64_t micro_index_ = 0;
  int64_t steps_this_run_ = 0;
  int64_t skipped_steps_ = 0;
  int64_t resumed_checkpoint_step_ = -1;
  Clock::time_point step_started_;
  Clock::time_point started_;  // when run() began
};

void TrainingRun::set_up() {
  generate_class_images(plan_, folder_, device_, group_.get());
  models_.emplace(load_training_models(folder_, config_, device_, precision_));
  trained_.emplace(models_->pipeline_modules(), trained_component_names(config_),
                   trained_part(config_));
  outputs_.dump_trained_start(options_.dump_dir, *trained_);
  dataset_.emplace(load_dataset(plan_));
  state_.config = config_.to_json();  // what checkpoints record, and what a resume compares
  state_.dataset = {dataset_->num_instance_images(), dataset_->num_class_images(),
                    (dataset_->size() + plan_.global_batch_size - 1) / plan_.global_batch_size,
                    plan_.global_batch_size};
  cursor_.emplace(*dataset_, static_cast<uint64_t>(config_.seed), plan_.global_batch_size,
                  plan_.parallel.world_size > 1, state_);
  shard_.emplace(plan_.parallel.rank, plan_.parallel.world_size,
                 config_.class_images.with_prior_preservation);
  check_same_data_everywhere();
  set_up_loss();
  const auto released = move_cached_frozen_models(*models_, config_, device_, /*to_host=*/true);
  for (const auto& name : released)
    log::info(name + " moved to the host: its work is cached (docs/memory.md)");
  set_up_update();
}

// Every process must walk the same data (a folder local to each node would not be): the
// numbers of photos and class images are compared across processes.
void TrainingRun::check_same_data_everywhere() {
  if (!group_) return;
  const std::vector<double> mine = {static_cast<double>(state_.dataset.instance_images),
                                    static_cast<double>(state_.dataset.class_images)};
  torch::Tensor sums = torch::tensor(mine, torch::kDouble).to(device_);
  group_->all_reduce_sum(sums);
  const torch::Tensor expected = torch::tensor(mine, torch::kDouble) * group_->size();
  if (torch::equal(sums.cpu(), expected)) return;
  throw InputDataError(log::str(
      "rank ", group_->rank(), " sees ", mine[0], " photos and ", mine[1],
      " class images, other processes of the run see others: instance_data_dir and "
      "class_data_dir must be the same folders for every process (shared storage across nodes)"));
}

void TrainingRun::set_up_loss() {
  const text::CLIPTokenizer& tokenizer = models_->tokenizer;
  const torch::Tensor instance_ids = tokenizer.encode_batch({config_.data.instance_prompt});
  const torch::Tensor class_ids = config_.class_images.with_prior_preservation
                                      ? tokenizer.encode_batch({config_.class_images.class_prompt})
                                      : torch::Tensor();
  PromptConditioning prompts(models_->text_encoder, instance_ids, class_ids,
                             trained_->trains("text_encoder"), device_);
  sampler_.emplace(*dataset_, models_->vae,
                   LossInputSampler::options_for(config_, models_->schedule.num_train_timesteps(),
                                                 models_->frozen_dtype, device_),
                   generator_);
  sampler_->cache_latents();
  DiffusionLoss::Options options = DiffusionLoss::options_for(config_, precision_, device_);
  // A cast cache would hold tensors of the graph's memory pool (micro_batch_pass.h).
  if (plan_.cuda_graphs) options.cache_weight_casts = false;
  // Without cache_latents the loss encodes each micro-batch's pixels (diffusion_loss.h).
  loss_.emplace(models_->schedule, models_->unet, std::move(prompts), options,
                config_.data.cache_latents ? models::AutoencoderKL(nullptr) : models_->vae);
}

void TrainingRun::set_up_update() {
  optim::OptimizerOptions options;
  UpdateOptions update;
  update.lr = lr_schedule_options(config_, plan_.total_steps,  // validated by plan_training
                                  plan_.parallel.world_size);
  update.max_grad_norm = config_.optimizer.max_grad_norm;
  update.precision = precision_;
  update.recovery_hint = [this] { return outputs_.last_checkpoint_hint(); };
  options.lr = update.lr.learning_rate;
  options.beta1 = config_.optimizer.adam_beta1;
  options.beta2 = config_.optimizer.adam_beta2;
  options.eps = config_.optimizer.adam_epsilon;
  options.weight_decay = config_.optimizer.adam_weight_decay;
  options.stochastic_rounding = config_.compute.weight_dtype == Precision::bf16;
  options.rounding_seed = static_cast<uint64_t>(config_.seed);
  auto optimizer =
      optim::make_optimizer(config_.resolved_optimizer(), trained_->named_parameters(), options);
  log::info(log::str("optimizer ", optimizer->name(), ": ", optimizer->num_parameters(),
                     " tensors, state ", format_gib(optimizer->state_bytes())));
  scaler_.emplace(precision_ == Precision::fp16, device_);
  if (config_.ema.use_ema) {
    EMAOptions ema_options;
    ema_options.decay = config_.ema.ema_decay;
    // offload_ema (the default) keeps the shadow on the CPU: 4 bytes per trained UNet parameter
    // out of GPU memory, at the price of a copy that waits for the GPU each step.
    ema_.emplace(trained_->component_parameters("unet"), ema_options,
                 config_.ema.offload_ema ? torch::Device(torch::kCPU) : device_);
  }
  std::unique_ptr<GradientReduction> reduction = std::make_unique<LocalGradients>();
  if (group_) {
    // In the order the backward pass produces gradients: the UNet's, last layer first, then
    // the text encoder's (it runs before the UNet).
    std::vector<torch::Tensor> arrival;
    for (const char* name : {"unet", "text_encoder"}) {
      if (!trained_->trains(name)) continue;
      const auto parameters = trained_->component_parameters(name);
      for (auto it = parameters.rbegin(); it != parameters.rend(); ++it)
        arrival.push_back(it->second);
    }
    TORCH_CHECK(arrival.size() == trained_->parameters().size(),
                "data parallel: a trained component is neither the UNet nor the text encoder");
    // SDTRAIN_BUCKET_BYTES: DDP's bucket_cap_mb, in bytes (tests use small buckets to have many).
    const char* bucket_bytes = std::getenv("SDTRAIN_BUCKET_BYTES");
    auto buckets = std::make_unique<BucketedAllReduce>(
        group_, arrival,
        bucket_bytes ? std::max<int64_t>(1, std::atoll(bucket_bytes))
                     : BucketedAllReduce::kDefaultBucketBytes);
    log::info(log::str("data parallel: ", group_->size(), " processes (", group_->backend(),
                       "), gradients in ", buckets->bucket_count(), " buckets"));
    reduction = std::move(buckets);
  }
  update_ = make_update_policy(plan_.fused_backward_pass, *trained_, std::move(optimizer),
                               *scaler_, ema(), update, std::move(reduction));
  if (!plan_.cuda_graphs) return use_eager_pass();
  // Capture excludes data parallel (cuda_graph_obstacle): this process has the whole batch,
  // all of the dataset when it is smaller (EpochCursor::next).
  const int64_t full_rows =
      std::min<int64_t>(plan_.global_batch_size, static_cast<int64_t>(dataset_->size())) *
      (config_.class_images.with_prior_preservation ? 2 : 1);
  pass_ = std::make_unique<CapturedPass>(*loss_, *scaler_, *update_, full_rows);
  update_->keep_gradients(true);
}

void TrainingRun::use_eager_pass() {
  pass_ = std::make_unique<EagerPass>(*loss_, *scaler_, config_.length.gradient_accumulation_steps);
  update_->keep_gradients(false);
}

void TrainingRun::resume() {
  if (config_.outputs.resume_from_checkpoint.empty()) return;
  const auto checkpoint =
      resolve_checkpoint(config_.outputs.output_dir, config_.outputs.resume_from_checkpoint);
  if (!checkpoint) {
    // prepare_output_dir refused a folder holding model files, so nothing is lost here.
    log::info("resume_from_checkpoint \"latest\": no checkpoint in " + config_.outputs.output_dir +
              ", starting afresh");
    return;
  }
  TrainerState saved = read_trainer_state(*checkpoint);
  check_saved_position(saved, state_.dataset, config_.outputs.resume_reset_epoch, *checkpoint);
  check_resumable_settings(saved, state_.config, *checkpoint);
  log::info(log::str("resuming from ", checkpoint->string(), " (step ", saved.global_step, ")"));
  trained_->load(*checkpoint, device_);
  update_->optimizer().load_state(io::SafetensorsFile(*checkpoint / kCheckpointOptimizerFile));
  if (ema_) ema_->load(*checkpoint / kCheckpointEmaDir / "diffusion_pytorch_model.safetensors");
  scaler_->set_state(saved.loss_scale, saved.loss_scale_growth_tracker);
  try {
    generator_.set_state(saved.rng_state);
  } catch (const c10::Error&) {
    throw ModelError(
        (*checkpoint / kCheckpointRandomStatesFile).string() +
        ": \"cpu_generator\" is not a CPU generator state; resume from another checkpoint");
  }
  saved.config = state_.config;
  saved.dataset = state_.dataset;
  state_ = saved;
  resumed_checkpoint_step_ = saved.global_step;
}

// The cadence: micro-batches until an optimizer step is due (every gradient_accumulation_steps
// and at the end of each epoch, as accelerate), then the step and what follows it.
void TrainingRun::train_loop() {
  check_interrupt();
  step_started_ = Clock::now();
  // tools/benchmark.py reads this line (the time to the first step it reports).
  outputs_.note(log::str("first step ",
                         format_number(std::chrono::duration<double>(step_started_ - started_)
                                           .count(),
                                       3),
                         " s after the run started"));
  profiler_.at_step_boundary(state_.global_step);
  while (state_.global_step < plan_.total_steps) {
    if (window_.count() == 0) update_->begin_step(state_.global_step);
    const std::vector<int64_t> indices = cursor_->next();
    const bool ends_step = window_.count() + 1 == config_.length.gradient_accumulation_steps ||
                           cursor_->at_epoch_end();
    micro_batch(indices, ends_step);
    if (ends_step) step();
  }
  settle_step();
}

void TrainingRun::micro_batch(const std::vector<int64_t>& indices, bool ends_step) {
  // Every process draws the global batch's noise and timesteps and keeps its rows, so N
  // processes train on what one process with the global batch would.
  const LossInputs inputs = shard_->take(sampler_->draw(indices));
  const LossOutput output = run_pass(inputs, ends_step);
  window_.add(output.loss);
  outputs_.dump_micro_batch(options_.dump_dir, micro_index_++, inputs, output, ends_step);
}

LossOutput TrainingRun::run_pass(const LossInputs& inputs, bool ends_step) {
  // Once the forward pass is queued, the device has work while the host reads the last step.
  const auto before_backward = [&] {
    settle_step();
    update_->before_backward(ends_step);
  };
  try {
    return pass_->run(inputs, before_backward);
  } catch (const CaptureFailed& failed) {
    if (config_.compute.cuda_graphs == AutoSwitch::on)
      throw ConfigError(log::str("\"cuda_graphs\": true, but the capture failed: ", failed.what(),
                                 "; set it to \"auto\" or false"));
    outputs_.note(log::str("cuda_graphs off: the capture failed (", failed.what(),
                           "); the passes run eagerly"));
    use_eager_pass();
    return pass_->run(inputs, before_backward);
  }
}

void TrainingRun::step() {
  StepRecord record;
  record.epoch = state_.epoch;
  update_->apply(state_.global_step);
  // After the update: its reduction is under way before the loss's all-reduce.
  loss_readback_.queue(window_.take_mean(group_.get()));
  state_.global_step += 1;
  kill_point("step");
  ++steps_this_run_;
  // Every kind of attention has run once by now (docs/performance.md, "Attention kernels").
  if (steps_this_run_ == 1) outputs_.note(models::describe_attention_kernels());
  record.step = state_.global_step;
  record.seconds = std::chrono::duration<double>(Clock::now() - step_started_).count();
  record.peak_memory = peak_device_memory_bytes(device_);
  record.peak_reserved = peak_reserved_device_memory_bytes(device_);
  unsettled_ = record;
  cursor_->close_finished_epoch();
  const int64_t step = state_.global_step;
  if (config_.outputs.checkpointing_steps > 0 && step % config_.outputs.checkpointing_steps == 0 &&
      step < plan_.total_steps) {
    save_checkpoint();
  }
  if (outputs_.validates_at(step)) {
    settle_step();  // EMA's average includes this step
    // A captured pass's pool and gradients would stay reserved beside the sampling's memory.
    pass_->release();
    move_cached_frozen_models(*models_, config_, device_, /*to_host=*/false);
    outputs_.sample_validation_images(step, *models_, *trained_, ema(), precision_);
    move_cached_frozen_models(*models_, config_, device_, /*to_host=*/true);
  }
  // The next step's time starts here: a checkpoint or validation is not part of it (their
  // log lines give their own time).
  step_started_ = Clock::now();
  check_interrupt();
  profiler_.at_step_boundary(state_.global_step);
}

// The last step's figures reach the host: its metrics line and progress, the loss checks, and
// what the update does once it knows them (update.h).
void TrainingRun::settle_step() {
  if (!unsettled_) return;
  StepRecord record = *unsettled_;
  unsettled_.reset();
  record.update = *update_->settle();
  record.loss = loss_readback_.take().at(0);
  skipped_steps_ += record.update.skipped ? 1 : 0;
  state_.last_loss = record.loss;
  check_loss(record.loss, record.step);
  outputs_.record_step(record, scaler_->enabled(), device_.is_cuda());
}

void TrainingRun::check_loss(double loss, int64_t step) const {
  if (std::isfinite(loss) || scaler_->enabled()) return;
  throw Error(ExitCode::training_diverged,
              log::str("the loss is ", loss, " at step ", step,
                       ": training diverged; lower learning_rate"));
}

void TrainingRun::save_checkpoint() {
  settle_step();  // the step counts and EMA the checkpoint holds are the settled ones
  state_.loss_scale = scaler_->scale_value();
  state_.loss_scale_growth_tracker = scaler_->growth_tracker();
  state_.rng_state = generator_.get_state();
  outputs_.save_checkpoint(state_, {*trained_, update_->optimizer(), ema()});
}

// A signal to one process stops them all at the same step boundary: under data parallel the
// processes agree on it first, so none is left waiting in a collective the others never join.
int TrainingRun::pending_signal() {
  const int signal = InterruptWatch::pending();
  if (!group_) return signal;
  torch::Tensor any = torch::full({1}, static_cast<double>(signal),
                                  torch::TensorOptions().dtype(torch::kDouble).device(device_));
  group_->all_reduce_sum(any);
  if (any.item<double>() == 0) return 0;
  return signal != 0 ? signal : SIGTERM;
}

void TrainingRun::check_interrupt() {
  const int signal = pending_signal();
  if (signal == 0) return;
  settle_step();
  // Nothing to save before the first step: the same command simply starts again.
  if (state_.global_step > 0 && outputs_.last_checkpoint_step() != state_.global_step)
    save_checkpoint();
  outputs_.finish_progress();
  throw Error(exit_code_for_signal(signal),
              log::str("interrupted at step ", state_.global_step, "/", plan_.total_steps,
                       "; resume with \"resume_from_checkpoint\": \"latest\" (or --set "
                       "resume_from_checkpoint=latest)"));
}

TrainSummary TrainingRun::run() {
  started_ = Clock::now();
  InterruptWatch interrupts;
  if (plan_.parallel.launched)
    group_ = ProcessGroup::connect(plan_.parallel, device_, kCollectiveTimeout);
  outputs_.take_output_dir();
  wait_for_every_process();  // the main process has locked and cleaned output_dir
  set_up();
  resume();
  outputs_.start(state_.global_step, resumed_checkpoint_step_);
  reset_peak_device_memory(device_);
  train_loop();
  outputs_.finish_progress();
  outputs_.export_model(*trained_, *models_, ema());
  TrainSummary summary;
  summary.steps = state_.global_step;
  summary.steps_this_run = steps_this_run_;
  summary.skipped_steps = skipped_steps_;
  summary.seconds = std::chrono::duration<double>(Clock::now() - started_).count();
  summary.final_loss = state_.last_loss;
  summary.output_dir = config_.outputs.output_dir;
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
  if (summary.skipped_steps > 0)
    out << ", " << summary.skipped_steps << " skipped for inf/NaN gradients";
  out << ") in " << format_duration(summary.seconds) << "; final loss "
      << format_number(summary.final_loss) << "; model: " << summary.output_dir.string();
  return out.str();
}

}  // namespace sdtrain::train
