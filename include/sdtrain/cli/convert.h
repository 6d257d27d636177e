#pragma once
// `sdtrain convert`: a base model written in the other layout (docs/single_file.md): a diffusers
// folder as one single file (LDM layout, with the .yaml sidecar of a v-prediction model), or a
// single file as a diffusers folder. What sdtrain reads is what it writes: the tensors pass
// through the loaders' checks and the single-file key rules.

#include <string>

#include "sdtrain/models/single_file_config.h"

namespace CLI {
class App;
}

namespace sdtrain::cli {

struct ConvertArguments {
  std::string model;  // a diffusers folder or a single .safetensors file
  std::string out;    // *.safetensors: a single file; anything else: a diffusers folder
  std::string dtype = "fp32";
  models::SingleFileOptions single_file;
};

void add_convert_options(CLI::App& command, ConvertArguments& args);
// Throws sdtrain::Error (ConfigError for --out naming the input, ModelError for the model).
int run_convert(const ConvertArguments& args);

}  // namespace sdtrain::cli
