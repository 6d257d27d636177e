// Times loading each model component of a diffusers folder, and what building it with its
// random initialisation would add (what every load paid before models/uninitialised.h).
// Prints one JSON line per component:
//   build_initialised_s    the module built from its config as torch::nn initialises it
//   build_uninitialised_s  the same inside UninitialisedScope
//   load_s                 models::load_* from the folder to --device in --dtype, as sdtrain
//                          loads it (uninitialised build + strict copy from the mapped file)
//   staged                 whether the copy went through the staging ring (models/staged_copy.h)
//
//   bench_model_load --model DIR [--device cpu|cuda:0] [--dtype float32|float16|bfloat16]
//       [--components unet,vae,text_encoder] [--staged auto|on|off] [--load-only]
//       [--whole one-after-another|at-once]
//
// --staged off is the direct per-tensor copy every load made before the ring; auto is what
// sdtrain does (staged on CUDA). --load-only skips the two builds (the initialised one takes
// seconds for the UNet). --whole times the three components as one load instead, one line:
// one after another (as every load ran before models/load_components.h) or at once (as
// sdtrain loads them now).
//
// Each timing is taken once, in a fresh process state per component (the page cache is warm
// after the first read: run it twice and keep the second line for a warm-cache figure).

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <functional>
#include <iostream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "bench_main.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/load_components.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/models/uninitialised.h"
#include "sdtrain/util/error.h"
#include "timing.h"

namespace {

using namespace sdtrain;
using Clock = std::chrono::steady_clock;

double seconds_of(const std::function<void()>& work) {
  const auto start = Clock::now();
  work();
  return std::chrono::duration<double>(Clock::now() - start).count();
}

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return torch::kFloat;
  if (name == "float16") return torch::kHalf;
  if (name == "bfloat16") return torch::kBFloat16;
  throw ConfigError("--dtype " + name + ": expected float32, float16 or bfloat16");
}

// One component's timings, given how to build it from its config and how to load it; the two
// builds unless `load_only`.
template <typename Module>
nlohmann::json time_component(const std::string& name, const std::function<Module()>& build,
                              const std::function<Module()>& load, const torch::Device& device,
                              bool load_only) {
  nlohmann::json report = {{"component", name}};
  if (!load_only) {
    report["build_initialised_s"] = seconds_of([&] { build(); });
    report["build_uninitialised_s"] = seconds_of([&] { models::build_uninitialised(build); });
  }
  int64_t parameters = 0;
  report["load_s"] = seconds_of([&] {
    Module module = load();
    synchronize(device);
    parameters = models::parameter_count(*module);
  });
  report["parameters"] = parameters;
  return report;
}

// The three components loaded as `whole` says: "at-once" (models::load_components) or
// "one-after-another".
nlohmann::json time_whole(const io::ModelFolder& folder, const models::LoadOptions& options,
                          const std::string& whole) {
  nlohmann::json report = {{"component", "text_encoder+unet+vae"}, {"whole", whole}};
  int64_t parameters = 0;
  report["load_s"] = seconds_of([&] {
    models::LoadedComponents loaded;
    if (whole == "at-once") {
      loaded = models::load_components(folder, {options, options, options, ""});
    } else {
      loaded.text_encoder = models::load_text_encoder(folder, options);
      loaded.unet = models::load_unet(folder, options);
      loaded.vae = models::load_vae(folder, options);
    }
    synchronize(options.device);
    parameters = models::parameter_count(*loaded.text_encoder) +
                 models::parameter_count(*loaded.unet) + models::parameter_count(*loaded.vae);
  });
  report["parameters"] = parameters;
  return report;
}

int run(int argc, char** argv) {
  CLI::App app{"Times loading each model component, with and without the random initialisation"};
  std::string model_dir, device_name = "cpu", dtype_name = "float32", staged = "auto";
  std::vector<std::string> components = {"unet", "vae", "text_encoder"};
  bool load_only = false;
  std::string whole;
  app.add_option("--model", model_dir, "diffusers model folder (with model_index.json)")
      ->required();
  app.add_option("--device", device_name, "cpu, cuda, cuda:N");
  app.add_option("--dtype", dtype_name, "float32, float16 or bfloat16");
  app.add_option("--components", components, "which components, comma separated")->delimiter(',');
  app.add_option("--staged", staged, "copy through the staging ring: auto (on CUDA), on, off")
      ->check(CLI::IsMember({"auto", "on", "off"}));
  app.add_flag("--load-only", load_only, "time the load alone, not the two builds");
  app.add_option("--whole", whole, "time the three components as one load instead")
      ->check(CLI::IsMember({"one-after-another", "at-once"}));
  CLI11_PARSE(app, argc, argv);

  const io::ModelFolder folder(model_dir);
  models::LoadOptions options{parse_dtype(dtype_name), torch::Device(device_name)};
  if (staged != "auto") options.staged = staged == "on";
  if (!whole.empty()) components = {"whole"};
  for (const auto& name : components) {
    nlohmann::json report;
    if (name == "whole") {
      report = time_whole(folder, options, whole);
    } else if (name == "unet") {
      const auto config = models::UNet2DConditionConfig::from_json(folder.config("unet"));
      report = time_component<models::UNet2DConditionModel>(
          name, [&] { return models::UNet2DConditionModel(config); },
          [&] { return models::load_unet(folder, options); }, options.device, load_only);
    } else if (name == "vae") {
      const auto config = models::AutoencoderKLConfig::from_json(folder.config("vae"));
      report = time_component<models::AutoencoderKL>(
          name, [&] { return models::AutoencoderKL(config); },
          [&] { return models::load_vae(folder, options); }, options.device, load_only);
    } else if (name == "text_encoder") {
      const auto config =
          models::CLIPTextConfig::from_json(folder.config("text_encoder"), "text_encoder");
      report = time_component<models::CLIPTextModel>(
          name, [&] { return models::CLIPTextModel(config); },
          [&] { return models::load_text_encoder(folder, options); }, options.device, load_only);
    } else {
      throw ConfigError("--components: " + name + " is not one of unet, vae, text_encoder");
    }
    report["device"] = device_name;
    report["dtype"] = dtype_name;
    report["threads"] = at::get_num_threads();
    report["staged"] = options.staged.value_or(models::staged_by_default(options.device));
    std::cout << report.dump() << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_reporting_errors("bench_model_load", [&] { return run(argc, argv); });
}
