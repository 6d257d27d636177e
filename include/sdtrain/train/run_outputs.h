#pragma once
// Everything a run writes, behind one guard: output_dir's lock and train_config.json,
// logs/metrics.jsonl, the progress line, checkpoints, validation grids and the exported model.
// With several processes only the main one writes (is_main_process false: each call does
// nothing): under torchrun (docs/scaling.md) every rank but 0.

#include <torch/torch.h>

#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <string>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/checkpoint.h"
#include "sdtrain/train/diffusion_loss.h"
#include "sdtrain/train/ema.h"
#include "sdtrain/train/plan.h"
#include "sdtrain/train/run_setup.h"
#include "sdtrain/train/trained_set.h"
#include "sdtrain/train/update.h"
#include "sdtrain/util/output_lock.h"
#include "sdtrain/util/progress.h"

namespace sdtrain::train {

// One optimizer step's worth of numbers, for the progress line and metrics.jsonl.
struct StepRecord {
  int64_t step = 0;
  int64_t epoch = 0;
  double loss = 0;
  UpdateResult update;
  double seconds = 0;
  int64_t peak_memory = 0;    // allocated, since the run started (device_memory.h)
  int64_t peak_reserved = 0;  // reserved, since the run started
};

// What a checkpoint holds besides the trainer state.
struct CheckpointContents {
  const TrainedSet& trained;
  const optim::Optimizer& optimizer;
  const EMAModel* ema;  // null without use_ema
};

class RunOutputs {
 public:
  RunOutputs(const TrainingPlan& plan, const io::ModelFolder& base, bool overwrite,
             bool is_main_process = true);

  // Locks output_dir (held until this object goes), removes what a killed run left, checks
  // the folder may be written (prepare_output_dir) and writes train_config.json.
  void take_output_dir();
  // Opens logs/metrics.jsonl for appending after dropping the records of steps after
  // `resumed_step`, and starts the progress line there.
  void start(int64_t resumed_step, int64_t last_checkpoint_step);
  void record_step(const StepRecord& record, bool loss_scaling, bool on_gpu);
  void note(const std::string& message);
  void finish_progress();

  // Writes checkpoint-<state.global_step> and prunes old ones (checkpoints_total_limit).
  void save_checkpoint(const TrainerState& state, const CheckpointContents& contents);
  int64_t last_checkpoint_step() const { return last_checkpoint_step_; }
  // " The last good checkpoint is …/checkpoint-N." or "" before the first.
  std::string last_checkpoint_hint() const;

  // Whether this process samples validation images after `step` (validation_steps, prompts
  // given, the main process).
  bool validates_at(int64_t step) const;
  // samples/step-N.png: diffusers' validation (DPM-Solver++ 2M, 25 steps, guidance 7.5, the
  // run's seed) with the training modules, the EMA weights swapped in with use_ema.
  void sample_validation_images(int64_t step, TrainingModels& models, const TrainedSet& trained,
                                EMAModel* ema, Precision precision);
  // The final model (the EMA average for the UNet with use_ema, as diffusers' EMA scripts).
  // Full: a diffusers folder, the base's components with the trained ones replaced, and/or
  // model.safetensors in the single-file layout (save_format). LoRA: the
  // adapter files of lora_formats (pytorch_lora_weights.safetensors, lora_kohya.safetensors).
  void export_model(const TrainedSet& trained, TrainingModels& models, const EMAModel* ema);

  // Tests only (TrainOptions::dump_dir): a micro-batch's inputs and loss, for replay with
  // diffusers by tools/dreambooth_reference.py.
  void dump_micro_batch(const std::filesystem::path& dump_dir, int64_t micro_index,
                        const LossInputs& inputs, const LossOutput& output, bool sync);
  // Tests only: a LoRA run's adapters before the first step (adapters-start.safetensors).
  void dump_trained_start(const std::filesystem::path& dump_dir, const TrainedSet& trained);

 private:
  void export_adapters(TrainingModels& models);
  void export_single_file(const std::map<std::string, io::NamedTensors>& components);
  void write_metrics(const StepRecord& record);

  const TrainingPlan& plan_;
  const TrainConfig& config_;
  const io::ModelFolder& base_;
  std::filesystem::path output_dir_;
  bool overwrite_;
  bool main_;
  std::optional<OutputLock> lock_;
  std::ofstream metrics_;
  std::unique_ptr<Progress> progress_;
  int64_t last_checkpoint_step_ = -1;
};

}  // namespace sdtrain::train
