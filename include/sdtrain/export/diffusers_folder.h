#pragma once
// Writing diffusers-layout folders: one model component (config.json + safetensors weights,
// what ModelMixin/PreTrainedModel.from_pretrained read) for checkpoints, and a whole pipeline
// (model_index.json + every component) that StableDiffusionPipeline.from_pretrained loads
// unchanged. Folders are assembled under a temporary name and renamed into place, so an
// interrupted save never leaves a half-written component under its real name.

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <optional>
#include <string>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"

namespace sdtrain::exporter {

// The weight file name diffusers or transformers expects for a component's library.
std::string weights_file_name(const std::string& library);

// Writes `dir` (replacing it if present) with `config_file` copied as config.json and
// `tensors` (cast to `dtype`) as `weights_name`.
void write_model_component(const std::filesystem::path& dir, const std::filesystem::path& config_file,
                           const io::NamedTensors& tensors, const std::string& weights_name,
                           std::optional<c10::ScalarType> dtype = std::nullopt);

struct PipelineExport {
  const io::ModelFolder* base = nullptr;  // the folder training started from
  std::string base_variant;               // the variant its weights were read from ("" or "fp16")
  // Components whose weights changed (e.g. "unet", "text_encoder"), keyed by name.
  std::map<std::string, io::NamedTensors> trained;
  c10::ScalarType dtype = torch::kFloat;  // every model component is written in this dtype
};

// Writes the pipeline into `output_dir` (which may hold other things: checkpoints, logs):
// trained components from their tensors; untouched model components copied byte for byte when
// already in `dtype` as one unsharded main file, else re-written in `dtype`; tokenizer,
// scheduler, feature_extractor and other non-model folders copied; model_index.json last.
// Weights always go in the main (non-variant) file names, so no `variant=` is needed to load.
// A single-file base has no component files to copy: `trained` must hold its every model
// component (models::add_base_components).
void export_pipeline(const PipelineExport& job, const std::filesystem::path& output_dir);

}  // namespace sdtrain::exporter
