#include "sdtrain/cli/cli.h"

#include <CLI/CLI.hpp>

#include <iostream>

#include "sdtrain/util/error.h"

namespace sdtrain::cli {

int run(int argc, char** argv) {
  CLI::App app{"sdtrain: DreamBooth fine-tuning for Stable Diffusion", "sdtrain"};
  app.set_version_flag("--version", std::string("sdtrain ") + SDTRAIN_VERSION);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return 0;
}

}  // namespace sdtrain::cli
