// The LoRA side of the command line: --lora on generate, generate --jobs (many adapters swapped
// on one loaded base) and merge-lora (docs/lora.md).
#include <CLI/CLI.hpp>
#include <charconv>
#include <fstream>
#include <nlohmann/json.hpp>

#include "generate_support.h"
#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/lora_file.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::cli {
namespace {

models::AdapterModels adapter_models(models::UNet2DConditionModel& unet,
                                     models::CLIPTextModel& text_encoder) {
  return {{"unet", unet.ptr().get()}, {"text_encoder", text_encoder.ptr().get()}};
}

// Reads, checks and attaches every file; with several, each is folded in before the next.
void attach_all(const models::AdapterModels& targets, const std::vector<LoRAChoice>& loras,
                c10::ScalarType dtype, bool always_merge) {
  for (const auto& lora : loras) {
    const models::LoRAFile file = models::read_lora_file(lora.file, targets);
    models::attach_lora_file(file, targets, lora.scale, dtype);
    log::info(log::str(
        "LoRA ", lora.file, " (", to_string(file.layout), " layout, ",
        file.components.count("unet") ? file.components.at("unet").size() : 0, " UNet and ",
        file.components.count("text_encoder") ? file.components.at("text_encoder").size() : 0,
        " text-encoder adapters) at scale ", lora.scale));
    if (always_merge || loras.size() > 1) {
      for (const auto& [name, module] : targets) models::merge_adapters(*module);
    }
  }
}

}  // namespace

LoRAChoice parse_lora_choice(const std::string& text) {
  // FILE:SCALE when what follows the last ':' is a number; a path may itself hold ':'.
  const auto colon = text.rfind(':');
  if (colon != std::string::npos && colon + 1 < text.size()) {
    const std::string tail = text.substr(colon + 1);
    double scale = 0;
    auto [end, error] = std::from_chars(tail.data(), tail.data() + tail.size(), scale);
    if (error == std::errc() && end == tail.data() + tail.size())
      return {text.substr(0, colon), scale};
  }
  if (text.empty()) throw ConfigError("--lora needs a file: --lora FILE[:SCALE]");
  return {text, 1.0};
}

void apply_loras(pipeline::StableDiffusionPipeline& sd, const std::vector<LoRAChoice>& loras) {
  attach_all(adapter_models(sd.unet(), sd.text_encoder()), loras, sd.settings().dtype, false);
}

void remove_loras(pipeline::StableDiffusionPipeline& sd) {
  models::remove_adapters(*sd.unet());
  models::remove_adapters(*sd.text_encoder());
}

void add_merge_lora_options(CLI::App& command, MergeLoRAArguments& args) {
  command.add_option("-m,--model", args.model,
                     "Base model: diffusers folder or SD 1.x/2.x single .safetensors file")
      ->required();
  command
      .add_option("--lora", args.loras,
                  "LoRA adapter file[:scale] (diffusers or kohya layout); repeatable")
      ->required();
  command.add_option("-o,--out", args.out, "The merged diffusers folder to write")->required();
  command.add_option("--dtype", args.dtype, "fp32 or fp16 weights in the written folder")
      ->capture_default_str();
}

int run_merge_lora(const MergeLoRAArguments& args) {
  if (args.dtype != "fp32" && args.dtype != "fp16")
    throw ConfigError("--dtype must be fp32 or fp16");
  std::vector<LoRAChoice> loras;
  for (const auto& text : args.loras) loras.push_back(parse_lora_choice(text));
  const io::ModelFolder base = models::open_base_model(args.model);
  const fs::path out = fs::absolute(args.out).lexically_normal();
  if (out == fs::absolute(base.source()).lexically_normal())
    throw ConfigError("--out " + args.out + " is the base model folder; choose another folder");
  // Folded in float32 on the CPU, whatever the file's dtype: one rounding, at the write.
  const models::LoadOptions fp32{torch::kFloat, torch::kCPU};
  auto unet = models::load_unet(base, fp32, "");
  auto text_encoder = models::load_text_encoder(base, fp32, "");
  attach_all(adapter_models(unet, text_encoder), loras, torch::kFloat, true);
  exporter::PipelineExport job;
  job.base = &base;
  job.dtype = args.dtype == "fp16" ? torch::kHalf : torch::kFloat;
  job.trained = {{"unet", models::state_dict(*unet)},
                 {"text_encoder", models::state_dict(*text_encoder)}};
  models::add_base_components(base, "", job.trained);  // the VAE of a single-file base
  exporter::export_pipeline(job, out);
  log::info("wrote " + out.string() +
            " (the base with the adapters merged; StableDiffusionPipeline.from_pretrained)");
  return 0;
}

}  // namespace sdtrain::cli
