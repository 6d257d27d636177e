// Loads one component of a diffusers model folder, runs its forward pass on inputs read from a
// safetensors file, writes the outputs to another safetensors file and prints one JSON line with
// the timing. tools/full_size_parity.py drives it to compare sdtrain with diffusers/transformers
// at full size (docs/parity.md); it also serves as a plain forward-pass benchmark.
//
//   bench_model_forward --model DIR --component text_encoder --inputs in.safetensors \
//       --outputs out.safetensors [--dtype float32|float16|bfloat16] [--device cpu|cuda:0]
//       [--variant fp16] [--warmup 1] [--repeat 3]
//   bench_model_forward --list        supported components and their tensors, one per line
//
// Each component is one entry of components() below: a loader returning the forward pass as
// named tensors in -> named tensors out. The names are the contract with full_size_parity.py:
//   text_encoder  in: input_ids [B, L] int64            out: last_hidden_state [B, L, D]
//   unet          in: sample [B, 4, h, w], timestep [B] int64, encoder_hidden_states [B, 77, D]
//                 out: sample [B, 4, h, w]
//   vae           in: x [B, 3, H, W] in [-1, 1], z [B, 4, H/8, W/8]
//                 out: latent_mean, latent_logvar (encode(x)), decoded (decode(z))
// Floating inputs are cast to --dtype; outputs are written as float32.

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <chrono>
#include <functional>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "bench_main.h"
#include "sdtrain/util/error.h"
#include "timing.h"

namespace {

using namespace sdtrain;
using Inputs = std::map<std::string, torch::Tensor>;
using Forward = std::function<io::NamedTensors(const Inputs&)>;

struct ComponentEntry {
  std::string name;
  std::string tensors;  // what --list prints: inputs -> outputs
  std::function<Forward(const io::ModelFolder&, const models::LoadOptions&, const std::string& variant,
                        int64_t* parameters)>
      load;
};

const torch::Tensor& require_input(const Inputs& inputs, const std::string& name) {
  auto it = inputs.find(name);
  if (it == inputs.end()) throw ConfigError("the inputs file has no tensor '" + name + "'");
  return it->second;
}

Forward load_text_encoder(const io::ModelFolder& folder, const models::LoadOptions& options,
                          const std::string& variant, int64_t* parameters) {
  auto model = models::load_text_encoder(folder, options, variant);
  model->eval();
  *parameters = models::parameter_count(*model);
  return [model](const Inputs& inputs) mutable {
    return io::NamedTensors{{"last_hidden_state", model(require_input(inputs, "input_ids"))}};
  };
}

Forward load_unet(const io::ModelFolder& folder, const models::LoadOptions& options, const std::string& variant,
                  int64_t* parameters) {
  auto model = models::load_unet(folder, options, variant);
  model->eval();
  *parameters = models::parameter_count(*model);
  return [model](const Inputs& inputs) mutable {
    torch::NoGradGuard no_grad;
    return io::NamedTensors{{"sample", model(require_input(inputs, "sample"), require_input(inputs, "timestep"),
                                             require_input(inputs, "encoder_hidden_states"))}};
  };
}

// One call runs both halves on independent inputs (encode(x), decode(z)), as the reference
// side does, so that a defect in either shows on its own output.
Forward load_vae(const io::ModelFolder& folder, const models::LoadOptions& options, const std::string& variant,
                 int64_t* parameters) {
  auto model = models::load_vae(folder, options, variant);
  model->eval();
  *parameters = models::parameter_count(*model);
  return [model](const Inputs& inputs) mutable {
    torch::NoGradGuard no_grad;
    auto posterior = model->encode(require_input(inputs, "x"));
    return io::NamedTensors{{"latent_mean", posterior.mean},
                            {"latent_logvar", posterior.logvar},
                            {"decoded", model->decode(require_input(inputs, "z"))}};
  };
}

const std::vector<ComponentEntry>& components() {
  static const std::vector<ComponentEntry> table = {
      {"text_encoder", "input_ids -> last_hidden_state", load_text_encoder},
      {"unet", "sample, timestep, encoder_hidden_states -> sample", load_unet},
      {"vae", "x, z -> latent_mean, latent_logvar, decoded", load_vae},
  };
  return table;
}

c10::ScalarType parse_dtype(const std::string& name) {
  if (name == "float32") return torch::kFloat;
  if (name == "float16") return torch::kHalf;
  if (name == "bfloat16") return torch::kBFloat16;
  if (name == "float64") return torch::kDouble;
  throw ConfigError("--dtype " + name + " is not one of float32, float16, bfloat16, float64");
}

int run(int argc, char** argv) {
  CLI::App app{"Runs one model component's forward pass on tensors from a safetensors file"};
  std::string model_dir, component, inputs_path, outputs_path, variant, dtype_name = "float32", device_name = "cpu";
  int warmup = 1, repeat = 3;
  bool list = false;
  app.add_flag("--list", list, "print the supported components and exit");
  app.add_option("--model", model_dir, "diffusers model folder (with model_index.json)");
  app.add_option("--component", component, "component to run, e.g. text_encoder");
  app.add_option("--inputs", inputs_path, "safetensors file with the input tensors");
  app.add_option("--outputs", outputs_path, "safetensors file to write the outputs to");
  app.add_option("--variant", variant, "weights variant, e.g. fp16");
  app.add_option("--dtype", dtype_name, "float32, float16, bfloat16 or float64");
  app.add_option("--device", device_name, "cpu, cuda, cuda:N");
  app.add_option("--warmup", warmup, "untimed forward passes first")->check(CLI::NonNegativeNumber);
  app.add_option("--repeat", repeat, "timed forward passes")->check(CLI::PositiveNumber);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& error) {
    return app.exit(error);
  }
  if (list) {
    for (const auto& entry : components()) std::cout << entry.name << "\t" << entry.tensors << "\n";
    return 0;
  }
  if (model_dir.empty() || component.empty() || inputs_path.empty() || outputs_path.empty()) {
    throw ConfigError("--model, --component, --inputs and --outputs are required (or --list)");
  }
  const ComponentEntry* entry = nullptr;
  std::string supported;
  for (const auto& candidate : components()) {
    if (candidate.name == component) entry = &candidate;
    supported += (supported.empty() ? "" : ", ") + candidate.name;
  }
  if (!entry) throw ConfigError("component '" + component + "' is not supported (supported: " + supported + ")");

  models::LoadOptions options{parse_dtype(dtype_name), torch::Device(device_name)};
  io::ModelFolder folder(model_dir);
  auto load_start = std::chrono::steady_clock::now();
  int64_t parameters = 0;
  Forward forward = entry->load(folder, options, variant, &parameters);
  double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();

  c10::InferenceMode inference;  // after loading: the weights stay ordinary tensors
  Inputs inputs;
  io::SafetensorsFile file(inputs_path);
  for (const auto& tensor : file.tensors()) {
    auto value = file.tensor(tensor.name).to(options.device);
    inputs[tensor.name] = value.is_floating_point() ? value.to(options.dtype) : value;
  }

  io::NamedTensors outputs;
  for (int i = 0; i < warmup; ++i) forward(inputs);
  synchronize(options.device);
  auto start = std::chrono::steady_clock::now();
  for (int i = 0; i < repeat; ++i) outputs = forward(inputs);
  synchronize(options.device);
  double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count() / repeat;

  nlohmann::json shapes = nlohmann::json::object();
  for (auto& [name, value] : outputs) {
    value = value.to(torch::kCPU, torch::kFloat).contiguous();
    shapes[name] = value.sizes().vec();
  }
  io::save_safetensors(outputs_path, outputs,
                       {{"component", component}, {"dtype", dtype_name}, {"device", device_name}});
  nlohmann::json report = {{"component", component},   {"dtype", dtype_name},   {"device", device_name},
                           {"parameters", parameters}, {"load_s", load_s},      {"ms_per_forward", ms},
                           {"warmup", warmup},         {"repeat", repeat},      {"threads", at::get_num_threads()},
                           {"outputs", shapes}};
  std::cout << report.dump() << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_reporting_errors("bench_model_forward", [&] { return run(argc, argv); });
}
