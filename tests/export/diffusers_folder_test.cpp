// The exported pipeline folder: trained components written from their tensors, untouched ones
// copied byte for byte (or converted to the save dtype), non-model folders copied, and the
// result loadable again by our own loaders (diffusers' loading is checked end to end in
// tests/train).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/export/diffusers_folder.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/util/atomic_file.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace sdtrain::exporter {
namespace {

fs::path demo_model() { return testing::source_dir() / "configs" / "demo" / "model"; }

io::NamedTensors doubled_unet() {
  io::SafetensorsFile file(demo_model() / "unet" / "diffusion_pytorch_model.safetensors");
  io::NamedTensors tensors;
  for (const auto& entry : file.tensors()) tensors.emplace_back(entry.name, file.tensor(entry.name) * 2);
  return tensors;
}

TEST(ExportPipeline, WritesTrainedWeightsAndCopiesTheRest) {
  const fs::path out = testing::scratch_dir() / "model";
  io::ModelFolder base(demo_model());
  PipelineExport job;
  job.base = &base;
  job.trained["unet"] = doubled_unet();
  export_pipeline(job, out);

  io::ModelFolder exported(out);
  EXPECT_EQ(exported.components().size(), base.components().size());
  models::UNet2DConditionModel unet = models::load_unet(exported, {});
  for (const auto& [name, tensor] : job.trained["unet"]) {
    ASSERT_TRUE(torch::equal(unet->named_parameters()[name], tensor)) << name;
  }
  for (const std::string file : {"vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
                                 "scheduler/scheduler_config.json", "model_index.json"}) {
    EXPECT_EQ(read_file(out / file), read_file(demo_model() / file)) << file;
  }
  for (const auto& entry : fs::directory_iterator(demo_model() / "tokenizer")) {
    EXPECT_TRUE(fs::exists(out / "tokenizer" / entry.path().filename())) << entry.path();
  }
  EXPECT_FALSE(fs::exists(out / ".unet.partial"));
}

TEST(ExportPipeline, Fp16WritesEveryModelComponentInHalfPrecision) {
  const fs::path out = testing::scratch_dir() / "model";
  io::ModelFolder base(demo_model());
  PipelineExport job;
  job.base = &base;
  job.trained["unet"] = doubled_unet();
  job.dtype = torch::kHalf;
  export_pipeline(job, out);
  for (const std::string file : {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                                 "text_encoder/model.safetensors"}) {
    io::SafetensorsFile written(out / file);
    for (const auto& entry : written.tensors()) {
      ASSERT_EQ(io::to_scalar_type(entry.dtype), torch::kHalf) << file << " " << entry.name;
    }
  }
}

TEST(ExportPipeline, ReExportReplacesComponentsInPlace) {
  const fs::path out = testing::scratch_dir() / "model";
  io::ModelFolder base(demo_model());
  PipelineExport job;
  job.base = &base;
  job.trained["unet"] = doubled_unet();
  export_pipeline(job, out);
  for (auto& [name, tensor] : job.trained["unet"]) tensor = tensor + 1;
  export_pipeline(job, out);
  io::SafetensorsFile written(out / "unet" / "diffusion_pytorch_model.safetensors");
  const auto& [name, tensor] = job.trained["unet"].front();
  EXPECT_TRUE(torch::equal(written.tensor(name), tensor));
  EXPECT_FALSE(fs::exists(out / ".unet.old"));
}

}  // namespace
}  // namespace sdtrain::exporter
