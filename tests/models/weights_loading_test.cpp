// Weight files as the Hub and save_pretrained lay them out: fp16 variants and sharded
// checkpoints with an index JSON (diffusers/transformers naming), loaded into the same model.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace sdtrain;

namespace {

fs::path copy_demo_model(const fs::path& dir) {
  fs::copy(sdtrain::testing::source_dir() / "configs" / "demo" / "model", dir / "model", fs::copy_options::recursive);
  return dir / "model";
}

// Rewrites text_encoder/ as two fp16 shards + model.safetensors.index.fp16.json, as
// save_pretrained(variant="fp16", max_shard_size=...) does.
void write_fp16_shards(const fs::path& model) {
  fs::path dir = model / "text_encoder";
  io::SafetensorsFile original(dir / "model.safetensors");
  io::NamedTensors shards[2];
  nlohmann::json weight_map;
  std::size_t i = 0;
  for (const auto& entry : original.tensors()) {
    std::size_t shard = i++ % 2;
    shards[shard].emplace_back(entry.name, original.tensor(entry.name).to(torch::kHalf));
    weight_map[entry.name] = "model.fp16-0000" + std::to_string(shard + 1) + "-of-00002.safetensors";
  }
  for (std::size_t s = 0; s < 2; ++s) {
    io::save_safetensors(dir / ("model.fp16-0000" + std::to_string(s + 1) + "-of-00002.safetensors"), shards[s]);
  }
  std::ofstream(dir / "model.safetensors.index.fp16.json") << nlohmann::json{{"metadata", {{"total_size", 0}}}, {"weight_map", weight_map}}.dump();
}

torch::Tensor encode(models::CLIPTextModel& model) {
  torch::NoGradGuard no_grad;
  return model->forward(torch::tensor({{1512, 320, 1125, 539, 1513, 0}}, torch::kLong));
}

}  // namespace

TEST(WeightsLoading, ShardedFp16VariantLoadsTheSameWeights) {
  auto dir = sdtrain::testing::scratch_dir();
  auto model_dir = copy_demo_model(dir);
  write_fp16_shards(model_dir);
  io::ModelFolder folder(model_dir);

  auto weights = folder.weights("text_encoder", "fp16");
  ASSERT_TRUE(weights.index.has_value());
  EXPECT_EQ(weights.files.size(), 2u);

  auto from_shards = models::load_text_encoder(folder, {}, "fp16");
  // The reference: the fp32 weights rounded through fp16, which is what the variant stores.
  auto rounded = models::load_text_encoder(folder, {});
  {
    torch::NoGradGuard no_grad;
    for (auto& p : rounded->parameters()) p.copy_(p.to(torch::kHalf).to(torch::kFloat));
  }
  EXPECT_TRUE(torch::equal(encode(from_shards), encode(rounded)));
}

TEST(WeightsLoading, IndexNamingAMissingShardIsAModelError) {
  auto dir = sdtrain::testing::scratch_dir();
  auto model_dir = copy_demo_model(dir);
  write_fp16_shards(model_dir);
  fs::remove(model_dir / "text_encoder" / "model.fp16-00002-of-00002.safetensors");
  try {
    io::ModelFolder(model_dir).weights("text_encoder", "fp16");
    FAIL() << "a missing shard was accepted";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("model.fp16-00002-of-00002.safetensors"), std::string::npos) << e.what();
  }
}

TEST(WeightsLoading, MissingVariantSaysToDropIt) {
  auto dir = sdtrain::testing::scratch_dir();
  io::ModelFolder folder(copy_demo_model(dir));
  try {
    folder.weights("unet", "fp16");
    FAIL() << "a missing variant was accepted";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("drop the \"fp16\" variant"), std::string::npos) << e.what();
  }
}
