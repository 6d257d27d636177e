// `sdtrain convert` (include/sdtrain/cli/convert.h): the demo model as one single file and back
// as a diffusers folder holds its tensors bit for bit (fp32); fp16 halves them; a v-prediction
// model gets its .yaml; --out naming the input is refused.
#include <gtest/gtest.h>

#include <fstream>
#include <map>
#include <nlohmann/json.hpp>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/single_file_config.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace {

using sdtrain::testing::run_sdtrain;

fs::path demo_model() { return sdtrain::testing::source_dir() / "configs" / "demo" / "model"; }

// sdtrain writes the text encoder's keys as its state_dict names them ("text_model.*"),
// transformers 5 without that prefix: both load the same module.
std::string without_prefix(const std::string& key) {
  return key.starts_with("text_model.") ? key.substr(11) : key;
}

void expect_same_file_tensors(const fs::path& a, const fs::path& b) {
  const sdtrain::io::SafetensorsFile fa(a), fb(b);
  ASSERT_EQ(fa.tensors().size(), fb.tensors().size()) << a;
  std::map<std::string, std::string> b_names;
  for (const auto& entry : fb.tensors()) b_names[without_prefix(entry.name)] = entry.name;
  for (const auto& entry : fa.tensors()) {
    auto it = b_names.find(without_prefix(entry.name));
    ASSERT_NE(it, b_names.end()) << entry.name;
    EXPECT_TRUE(torch::equal(fa.tensor(entry.name), fb.tensor(it->second)))
        << a << ": " << entry.name;
  }
}

TEST(Convert, FolderToSingleFileAndBackIsBitExact) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const std::string file = (dir / "demo.safetensors").string();
  auto to_file = run_sdtrain("convert --model " + demo_model().string() + " --out " + file);
  ASSERT_EQ(to_file.code, 0) << to_file.output;
  EXPECT_FALSE(fs::exists(dir / "demo.yaml"));  // an epsilon model needs no sidecar
  auto back = run_sdtrain("convert --model " + file + " --single-file-config " +
                          demo_model().string() + " --out " + (dir / "back").string());
  ASSERT_EQ(back.code, 0) << back.output;
  for (const char* weights :
       {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors"})
    expect_same_file_tensors(dir / "back" / weights, demo_model() / weights);
  EXPECT_TRUE(fs::exists(dir / "back" / "model_index.json"));

  auto half = run_sdtrain("convert --model " + demo_model().string() + " --dtype fp16 --out " +
                          (dir / "half.safetensors").string());
  ASSERT_EQ(half.code, 0) << half.output;
  const sdtrain::io::SafetensorsFile half_file(dir / "half.safetensors");
  EXPECT_EQ(half_file.tensor("model.diffusion_model.input_blocks.0.0.weight").scalar_type(),
            torch::kHalf);

  auto onto_itself = run_sdtrain("convert --model " + file + " --single-file-config " +
                                 demo_model().string() + " --out " + file);
  EXPECT_EQ(onto_itself.code, 1) << onto_itself.output;
  EXPECT_NE(onto_itself.output.find("is the model being converted"), std::string::npos)
      << onto_itself.output;
}

TEST(Convert, AVPredictionModelGetsItsSidecar) {
  const fs::path dir = sdtrain::testing::scratch_dir();
  const fs::path model = dir / "v-model";
  fs::copy(demo_model(), model, fs::copy_options::recursive);
  nlohmann::json scheduler =
      nlohmann::json::parse(std::ifstream(model / "scheduler" / "scheduler_config.json"));
  scheduler["prediction_type"] = "v_prediction";
  std::ofstream(model / "scheduler" / "scheduler_config.json") << scheduler.dump(2);
  auto run = run_sdtrain("convert --model " + model.string() + " --out " +
                         (dir / "v.safetensors").string());
  ASSERT_EQ(run.code, 0) << run.output;
  const auto sidecar = sdtrain::models::read_ldm_sidecar(dir / "v.safetensors");
  ASSERT_TRUE(sidecar);
  EXPECT_EQ(sidecar->path.filename(), "v.yaml");
  EXPECT_EQ(sidecar->prediction_type, "v_prediction");
}

}  // namespace
