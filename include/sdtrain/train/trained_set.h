#pragma once
// What a run trains, decided and owned in one place: which modules' parameters are trained,
// the names the optimizer and checkpoints know them by, how a checkpoint saves and restores
// them, what the final export takes from them, and their size for `--dry-run`. Every other
// piece of the trainer asks the TrainedSet instead of reading train_text_encoder itself (see
// docs/architecture.md). Two parts of a module can be trained: all its weights (full
// fine-tuning) or only the LoRA adapters attached to it (train_mode "lora", the base frozen).

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/output_dir.h"
#include "sdtrain/train/train_config.h"

namespace sdtrain::train {

// What of a trained module trains.
enum class TrainedPart { weights, adapters };

// The components `config` trains, by diffusers folder name, in the order the optimizer sees
// their parameters: "unet", then "text_encoder" when train_text_encoder is set.
std::vector<std::string> trained_component_names(const TrainConfig& config);
// Their weights (train_mode "full") or their adapters (train_mode "lora").
TrainedPart trained_part(const TrainConfig& config);

// A module of the pipeline that the run may train or keep frozen.
struct PipelineModule {
  std::string name;          // diffusers folder: "unet", "text_encoder", "vae"
  std::string weights_name;  // weight-file stem there: "diffusion_pytorch_model", "model"
  std::shared_ptr<torch::nn::Module> module;
  models::KeyMapper map_key;  // legacy spellings a checkpoint may hold (may be empty)
};

class TrainedSet {
 public:
  // Trains the modules named in `trained` (train mode; their weights, or only their attached
  // adapters, require gradients) and freezes the rest (no gradients, eval mode). Every name in
  // `trained` must be a module.
  TrainedSet(const std::vector<PipelineModule>& modules, const std::vector<std::string>& trained,
             TrainedPart part = TrainedPart::weights);

  const std::vector<PipelineModule>& components() const { return components_; }
  bool trains(const std::string& name) const;
  TrainedPart part() const { return part_; }
  // The trained parameters of one component under its own keys ("down_blocks.0…"): what the
  // EMA of the UNet shadows. Empty when the component is not trained.
  io::NamedTensors component_parameters(const std::string& name) const;

  // "<component>.<parameter key>" with the parameter, in a fixed order: what the optimizer
  // steps and what its checkpoint state is keyed by.
  optim::NamedParameters named_parameters() const;
  std::vector<torch::Tensor> parameters() const;
  // Each parameter's .grad(), undefined where none was accumulated.
  std::vector<torch::Tensor> gradients() const;
  // Bytes of the trained values (what a checkpoint's weights hold).
  int64_t bytes() const;

  // Checkpoint, in float32. Weights: <dir>/<component>/config.json (from `base`) + weights,
  // each a diffusers component folder that from_pretrained loads. Adapters: <dir>/
  // pytorch_lora_weights.safetensors, which load_lora_weights loads.
  void save(const std::filesystem::path& dir, const io::ModelFolder& base) const;
  // Restores what save() wrote, strictly (every tensor present with its shape, nothing else),
  // as float32 on `device`. Throws ModelError naming the file.
  void load(const std::filesystem::path& dir, torch::Device device);
  // The trained weights for the final export, by component name (weights only).
  std::map<std::string, io::NamedTensors> weights() const;

 private:
  void save_adapters(const std::filesystem::path& file) const;
  void load_adapters(const std::filesystem::path& file, torch::Device device);

  std::vector<PipelineModule> components_;
  TrainedPart part_;
};

}  // namespace sdtrain::train
