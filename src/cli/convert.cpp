#include "sdtrain/cli/convert.h"

#include <CLI/CLI.hpp>

#include "generate_support.h"
#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace fs = std::filesystem;

namespace sdtrain::cli {

void add_convert_options(CLI::App& command, ConvertArguments& args) {
  command
      .add_option("-m,--model", args.model,
                  "Diffusers folder or SD 1.x/2.x single .safetensors file to convert")
      ->required();
  command
      .add_option("-o,--out", args.out,
                  "FILE.safetensors: one single file (LDM layout); any other path: a diffusers "
                  "folder")
      ->required();
  command.add_option("--dtype", args.dtype, "fp32 or fp16 weights")->capture_default_str();
  add_single_file_options(command, args.single_file);
}

int run_convert(const ConvertArguments& args) {
  if (args.dtype != "fp32" && args.dtype != "fp16")
    throw ConfigError("--dtype must be fp32 or fp16");
  const io::ModelFolder base = models::open_base_model(args.model, args.single_file);
  const fs::path out = fs::absolute(args.out).lexically_normal();
  if (out == fs::absolute(base.source()).lexically_normal())
    throw ConfigError("--out " + args.out + " is the model being converted; choose another path");
  const c10::ScalarType dtype = args.dtype == "fp16" ? torch::kHalf : torch::kFloat;
  std::map<std::string, io::NamedTensors> components;
  models::add_base_components(base, "", components);  // every tensor through the loaders' checks
  if (out.extension() == ".safetensors") {
    const bool sidecar = models::write_single_file(
        out, base, components, dtype,
        {{"sdtrain_version", SDTRAIN_VERSION}, {"sdtrain_base_model", args.model}});
    log::info("wrote " + out.string() + " (original LDM layout: AUTOMATIC1111, ComfyUI)" +
              (sidecar ? ", with its .yaml (v-prediction)" : ""));
    return 0;
  }
  exporter::PipelineExport job;
  job.base = &base;
  job.dtype = dtype;
  job.trained = std::move(components);
  exporter::export_pipeline(job, out);
  log::info("wrote " + out.string() + " (StableDiffusionPipeline.from_pretrained)");
  return 0;
}

}  // namespace sdtrain::cli
