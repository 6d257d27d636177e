#pragma once
// Setting a run up, before its first step: the class images prior preservation needs, the
// models in the dtypes and modes training uses, and the data (docs/training.md, "Phases").

#include <torch/torch.h>

#include <vector>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/schedulers/noise_schedule.h"
#include "sdtrain/text/clip_tokenizer.h"
#include "sdtrain/train/dataset.h"
#include "sdtrain/train/distributed.h"
#include "sdtrain/train/mixed_precision.h"
#include "sdtrain/train/plan.h"
#include "sdtrain/train/trained_set.h"

namespace sdtrain::train {

// Generates the class images the plan found missing, before the training models load (as
// train_dreambooth.py does, so the sampler's memory is free again when training starts).
// Interrupted: every image written so far is kept and the Error carries the signal's code.
// Under data parallel (`group`), the processes count the images together, each writes its share
// and all wait until every image is there.
void generate_class_images(const TrainingPlan& plan, const io::ModelFolder& base,
                           torch::Device device, ProcessGroup* group = nullptr);

struct TrainingModels {
  text::CLIPTokenizer tokenizer;
  models::CLIPTextModel text_encoder;
  models::AutoencoderKL vae;
  models::UNet2DConditionModel unet;
  schedulers::NoiseSchedule schedule;
  c10::ScalarType frozen_dtype;  // the VAE's (and a frozen text encoder's) dtype

  // The modules a TrainedSet chooses from.
  std::vector<PipelineModule> pipeline_modules() const;
};

// Frozen models whose work the run has cached (docs/memory.md): the VAE once cache_latents has
// encoded every image, a frozen text encoder once the prompts are encoded. `to_host` moves them
// off a CUDA training device; false brings them back (validation samples with them). Nothing
// moves on the CPU. Returns the names moved.
std::vector<std::string> move_cached_frozen_models(TrainingModels& models, const TrainConfig& config,
                                                   torch::Device device, bool to_host);

// train_dreambooth.py's dtypes: trained models in float32 (master weights), frozen ones in the
// mixed-precision dtype on a GPU; float32 everything on the CPU. Gradient checkpointing and
// TF32 as configured.
TrainingModels load_training_models(const io::ModelFolder& base, const TrainConfig& config,
                                    torch::Device device, Precision precision);

// The photos of the plan and the class images now in class_data_dir, decoded and resized.
DreamBoothDataset load_dataset(const TrainingPlan& plan);

}  // namespace sdtrain::train
