#include "sdtrain/export/diffusers_folder.h"

#include <system_error>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/kill_point.h"
#include "sdtrain/util/staged_folder.h"

namespace fs = std::filesystem;

namespace sdtrain::exporter {

namespace {

void create_folder(const fs::path& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  if (error) throw OutputError("cannot create folder " + dir.string() + ": " + error.message());
}

// The base component's weights as one file in `dtype`: a byte copy when they already are.
void write_untouched_weights(const io::ModelFolder& base, const io::Component& component,
                             const std::string& variant, c10::ScalarType dtype, const fs::path& target) {
  io::WeightFiles files;
  try {
    files = base.weights(component.name, variant);
  } catch (const ModelError&) {
    files = base.weights(component.name, "");  // variants usually cover the UNet/VAE/text encoder only
  }
  const std::vector<io::SafetensorsHeader> headers = io::read_weight_headers(files);
  bool same_dtype = true;
  for (const auto& header : headers) {
    for (const auto& entry : header.tensors) same_dtype = same_dtype && io::to_scalar_type(entry.dtype) == dtype;
  }
  if (files.files.size() == 1 && same_dtype) {
    copy_file_atomically(files.files.front(), target);
    return;
  }
  io::NamedTensors tensors;
  std::vector<io::SafetensorsFile> opened;
  for (const auto& file : files.files) opened.emplace_back(file);
  for (const auto& file : opened) {
    for (const auto& entry : file.tensors()) tensors.emplace_back(entry.name, file.tensor(entry.name).to(dtype));
  }
  io::save_safetensors(target, tensors);
}

void copy_folder_files(const fs::path& from, const fs::path& to) {
  for (const auto& entry : fs::directory_iterator(from)) {
    if (entry.is_regular_file()) copy_file_atomically(entry.path(), to / entry.path().filename());
  }
}

}  // namespace

std::string weights_file_name(const std::string& library) {
  return library == "diffusers" ? "diffusion_pytorch_model.safetensors" : "model.safetensors";
}

void write_model_component(const fs::path& dir, const fs::path& config_file, const io::NamedTensors& tensors,
                           const std::string& weights_name, std::optional<c10::ScalarType> dtype) {
  StagedFolder staged(dir);
  copy_file_atomically(config_file, staged.path() / "config.json");
  if (dtype) {
    io::NamedTensors cast;
    cast.reserve(tensors.size());
    for (const auto& [name, tensor] : tensors) cast.emplace_back(name, tensor.to(*dtype));
    io::save_safetensors(staged.path() / weights_name, cast);
  } else {
    io::save_safetensors(staged.path() / weights_name, tensors);
  }
  staged.publish();
}

void export_pipeline(const PipelineExport& job, const fs::path& output_dir) {
  if (!job.base) throw std::invalid_argument("export_pipeline: no base model folder");
  const io::ModelFolder& base = *job.base;
  create_folder(output_dir);
  // model_index.json marks a finished folder: it goes first and comes back last, so a reader
  // (from_pretrained, sdtrain generate) never loads components of two different exports, and
  // an export killed half way leaves a folder that no loader takes for a model.
  std::error_code error;
  fs::remove(output_dir / "model_index.json", error);
  if (error) throw OutputError("cannot remove " + (output_dir / "model_index.json").string() + ": " + error.message());
  sync_directory(output_dir);
  for (const auto& component : base.components()) {
    const fs::path target = output_dir / component.name;
    auto trained = job.trained.find(component.name);
    if (trained != job.trained.end()) {
      write_model_component(target, base.config_path(component.name), trained->second,
                            weights_file_name(component.library), job.dtype);
      kill_point("export-component");
      continue;
    }
    if (base.single_file() && fs::exists(component.dir / "config.json"))
      throw std::invalid_argument("export_pipeline: a single-file base's " + component.name +
                                  " must be given (models::add_base_components)");
    StagedFolder staged(target);
    // Model components have config.json; tokenizer, scheduler and feature extractor do not.
    if (fs::exists(component.dir / "config.json")) {
      copy_file_atomically(component.dir / "config.json", staged.path() / "config.json");
      write_untouched_weights(base, component, job.base_variant, job.dtype,
                              staged.path() / weights_file_name(component.library));
    } else {
      copy_folder_files(component.dir, staged.path());
    }
    staged.publish();
    kill_point("export-component");
  }
  kill_point("export-before-index");
  copy_file_atomically(base.root() / "model_index.json", output_dir / "model_index.json");
}

}  // namespace sdtrain::exporter
