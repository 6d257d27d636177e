#include "sdtrain/models/base_model.h"

#include <stdlib.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <stdexcept>

#include "sdtrain/io/checkpoint_kind.h"
#include "sdtrain/io/host_weights.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/single_file.h"
#include "sdtrain/models/single_file_config.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/text/bundled_tokenizer.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "sdtrain/util/log.h"

namespace sdtrain::models {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// A folder under the system temporary directory, removed with everything in it when the last
// ModelFolder holding it goes.
struct TemporaryFolder {
  fs::path path;
  TemporaryFolder() {
    std::string pattern = (fs::temp_directory_path() / "sdtrain-base-XXXXXX").string();
    if (!mkdtemp(pattern.data()))
      throw OutputError("cannot create a folder in " + fs::temp_directory_path().string() +
                        " for the single file's configuration; set TMPDIR to a writable folder");
    path = pattern;
  }
  ~TemporaryFolder() {
    std::error_code ignored;
    fs::remove_all(path, ignored);
  }
};

[[noreturn]] void refuse_file(const fs::path& file, const io::CheckpointDetection& detected) {
  std::string what = detected.description;
  if (!detected.evidence.empty()) what += " (key " + detected.evidence.front() + ")";
  const bool lora = detected.kind == io::CheckpointKind::lora_diffusers ||
                    detected.kind == io::CheckpointKind::lora_kohya;
  throw ModelError(file.string() + ": " + what +
                   (lora ? ". A LoRA file is not a base: give its base model, and the file to "
                           "`generate --lora` (or merge it with `sdtrain merge-lora`)"
                         : ". A base model is a diffusers folder or a Stable Diffusion 1.x/2.x "
                           "single file"));
}

void write_json(const fs::path& path, const json& value) {
  fs::create_directories(path.parent_path());
  write_file_atomically(path, value.dump(2) + "\n");
}

// model_index.json and the configs diffusers would hold for the file; the bundled tokenizer.
void write_config_folder(const fs::path& dir, const SingleFileConfigs& configs) {
  const bool sd2 = configs.family == io::CheckpointKind::sd2_single_file;
  write_json(dir / "model_index.json",
             {{"_class_name", "StableDiffusionPipeline"},
              {"_diffusers_version", configs.unet["_diffusers_version"]},
              {"feature_extractor", {nullptr, nullptr}},
              {"requires_safety_checker", false},
              {"safety_checker", {nullptr, nullptr}},
              {"scheduler", {"diffusers", configs.scheduler["_class_name"]}},
              {"text_encoder", {"transformers", "CLIPTextModel"}},
              {"tokenizer", {"transformers", "CLIPTokenizer"}},
              {"unet", {"diffusers", "UNet2DConditionModel"}},
              {"vae", {"diffusers", "AutoencoderKL"}}});
  write_json(dir / "unet" / "config.json", configs.unet);
  write_json(dir / "vae" / "config.json", configs.vae);
  write_json(dir / "text_encoder" / "config.json", configs.text_encoder);
  write_json(dir / "scheduler" / "scheduler_config.json", configs.scheduler);
  text::write_bundled_tokenizer(sd2 ? text::BundledTokenizer::sd2 : text::BundledTokenizer::sd1,
                                dir / "tokenizer");
}

void check_options_for_folder(const fs::path& folder, const SingleFileOptions& options) {
  for (const auto& [key, set] :
       {std::pair{"single_file_config", !options.single_file_config.empty()},
        std::pair{"single_file_prediction_type", !options.single_file_prediction_type.empty()},
        std::pair{"use_ema_weights", options.use_ema_weights}}) {
    if (set)
      throw ConfigError(std::string("\"") + key + "\" applies to a single-file base; " +
                        folder.string() + " is a diffusers folder: remove the key");
  }
}

io::SingleFileSource describe_source(const fs::path& file, const io::SafetensorsHeader& header,
                                     const SingleFileOptions& options) {
  io::SingleFileSource source{file, options.use_ema_weights, {}, nullptr};
  const bool has_ema = std::any_of(header.tensors.begin(), header.tensors.end(),
                                   [](const auto& t) { return t.name.starts_with("model_ema."); });
  if (options.use_ema_weights && !has_ema)
    throw ConfigError("\"use_ema_weights\": " + file.string() +
                      " holds no EMA weights (model_ema.*); remove the key");
  if (has_ema)
    source.notes.push_back(options.use_ema_weights
                               ? "UNet from the file's EMA weights (use_ema_weights)"
                               : "the file's EMA weights (model_ema.*) are not used; "
                                 "\"use_ema_weights\": true trains from them");
  return source;
}

io::ModelFolder open_single_file(const fs::path& file, const io::SafetensorsHeader& header,
                                 const SingleFileOptions& options) {
  io::SingleFileSource source = describe_source(file, header, options);
  if (!options.single_file_config.empty()) {
    if (!options.single_file_prediction_type.empty())
      throw ConfigError(
          "\"single_file_prediction_type\" and \"single_file_config\" both given: "
          "the folder's scheduler config says the prediction type; remove one");
    source.notes.push_back("configs and tokenizer from single_file_config " +
                           options.single_file_config);
    return io::ModelFolder(options.single_file_config, std::move(source));
  }
  const SingleFileConfigs configs = infer_single_file_configs(
      header, file, options.single_file_prediction_type, read_ldm_sidecar(file));
  auto folder = std::make_shared<TemporaryFolder>();
  write_config_folder(folder->path, configs);
  source.notes.insert(source.notes.begin(), configs.notes.begin(), configs.notes.end());
  source.keep_alive = folder;
  return io::ModelFolder(folder->path, std::move(source));
}

}  // namespace

SingleFileLayout single_file_layout(const io::ModelFolder& folder) {
  try {
    return single_file_layout(
        UNet2DConditionConfig::from_json(folder.config("unet"),
                                         folder.config_path("unet").string()),
        AutoencoderKLConfig::from_json(folder.config("vae"), folder.config_path("vae").string()),
        CLIPTextConfig::from_json(folder.config("text_encoder"),
                                  folder.config_path("text_encoder").string()));
  } catch (const std::invalid_argument& error) {
    throw ModelError(folder.config_path("unet").string() + ": " + error.what());
  }
}

bool write_single_file(const fs::path& path, const io::ModelFolder& base,
                       const std::map<std::string, io::NamedTensors>& components,
                       c10::ScalarType dtype, const std::map<std::string, std::string>& metadata) {
  const SingleFileLayout layout = single_file_layout(base);
  io::NamedTensors tensors = to_single_file(components, layout);
  for (auto& [key, tensor] : tensors) tensor = tensor.detach().to(torch::kCPU, dtype);
  io::save_safetensors(path, tensors, metadata);
  fs::path sidecar = path;
  sidecar.replace_extension(".yaml");
  const std::string prediction = base.config("scheduler").value("prediction_type", "epsilon");
  if (prediction != "v_prediction") {
    std::error_code ignored;
    fs::remove(sidecar, ignored);
    return false;
  }
  write_file_atomically(sidecar,
                        ldm_sidecar_text(base.config("unet"), base.config("vae"), prediction,
                                         layout.text_encoder == LdmTextEncoder::open_clip));
  return true;
}

void add_base_components(const io::ModelFolder& folder, const std::string& variant,
                         std::map<std::string, io::NamedTensors>& components) {
  const LoadOptions fp32{torch::kFloat, torch::kCPU};
  if (!components.count("unet")) components["unet"] = state_dict(*load_unet(folder, fp32, variant));
  if (!components.count("vae")) components["vae"] = state_dict(*load_vae(folder, fp32, variant));
  if (!components.count("text_encoder"))
    components["text_encoder"] = state_dict(*load_text_encoder(folder, fp32, variant));
}

io::ModelFolder open_base_model(const fs::path& path, const SingleFileOptions& options) {
  if (!fs::is_regular_file(path)) {
    check_options_for_folder(path, options);
    return io::ModelFolder(path);
  }
  const std::string ext = path.extension().string();
  if (ext == ".ckpt" || ext == ".pt" || ext == ".pth" || ext == ".bin")
    throw ModelError(path.string() +
                     ": a pickled checkpoint; sdtrain does not read pickles, because loading one "
                     "can run any code it holds. Convert it to .safetensors with a tool you trust "
                     "(it is then read as a single file), or use the model's diffusers folder");
  if (ext != ".safetensors")
    throw ModelError(path.string() +
                     ": not a .safetensors file; a base model is a diffusers "
                     "folder or a Stable Diffusion 1.x/2.x single .safetensors file");
  const io::SafetensorsHeader header = io::read_safetensors_header(path);
  const io::CheckpointDetection detected = io::detect_checkpoint(header);
  if (detected.kind != io::CheckpointKind::sd1_single_file &&
      detected.kind != io::CheckpointKind::sd2_single_file)
    refuse_file(path, detected);
  return open_single_file(path, header, options);
}

namespace {

void read_component_weights(torch::nn::Module& module, const io::ModelFolder& folder,
                            const std::string& name, const LoadOptions& options,
                            const std::string& variant, const KeyMapper& map_key) {
  const io::SingleFileSource* single = folder.single_file();
  if (!single) return load_state_dict(module, folder.weights(name, variant), options, map_key);
  const SingleFileLayout layout = single_file_layout(folder);
  const io::SafetensorsFile file(single->file);
  assign_state_dict(
      module, from_single_file(file, name, state_dict(module), layout, single->use_ema_weights),
      options);
}

}  // namespace

void load_component_weights(torch::nn::Module& module, const io::ModelFolder& folder,
                            const std::string& name, const LoadOptions& options,
                            const std::string& variant, const KeyMapper& map_key) {
  io::HostWeights* host = folder.host_weights();
  if (!host) return read_component_weights(module, folder, name, options, variant, map_key);
  const std::string key = variant.empty() ? name : name + "/" + variant;
  const io::NamedTensors* kept = host->find(key);
  if (!kept) {
    // float32 holds every dtype a file may store exactly, so a later cast to the run's dtype
    // gives the bits a direct read would.
    read_component_weights(module, folder, name, {torch::kFloat, torch::kCPU}, variant, map_key);
    io::NamedTensors tensors = state_dict(module);
    // detach: a tensor of its own, keeping this storage when assign_state_dict gives the
    // module's tensors new data below.
    for (auto& [tensor_key, tensor] : tensors) tensor = tensor.detach();
    kept = &host->keep(key, std::move(tensors));
    log::info("read the " + key + " weights from disk (" + folder.source().string() +
              "); kept in host memory for the next subjects");
  }
  assign_state_dict(module, *kept, options);
}

}  // namespace sdtrain::models
