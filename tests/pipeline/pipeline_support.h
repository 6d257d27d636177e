#pragma once
// The bundled tiny model, loaded once per test binary, and the pipeline fixtures of
// tools/make_pipeline_fixtures.py.

#include <gtest/gtest.h>

#include "sdtrain/pipeline/stable_diffusion_pipeline.h"
#include "test_support.h"

namespace sdtrain::testing {

inline const char* kRegeneratePipelineFixtures =
    "the fixtures come from the reference environment; regenerate them with\n"
    "  ~/.cache/sdtrain/venv/bin/python tools/make_pipeline_fixtures.py\n"
    "(and commit tests/fixtures/pipeline/)";

inline std::filesystem::path demo_model() { return source_dir() / "configs" / "demo" / "model"; }

inline pipeline::StableDiffusionPipeline& demo_pipeline() {
  static pipeline::StableDiffusionPipeline instance =
      pipeline::StableDiffusionPipeline::from_folder(demo_model(), pipeline::PipelineSettings{});
  return instance;
}

}  // namespace sdtrain::testing
