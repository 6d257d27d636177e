// The component configs sdtrain builds from a single file's keys and shapes
// (include/sdtrain/models/single_file_config.h), checked against the published configs of SD
// 1.5, SD 2.1-base and SD 2.1-768 (tests/fixtures/configs/). The files' headers are rebuilt
// from the key maps of tests/fixtures/single_file/ (every LDM key with its shape); no weights
// are needed. Also the .yaml sidecar, read and written.
#include "sdtrain/models/single_file_config.h"

#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "test_support.h"

namespace sdtrain::models {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::vector<int64_t> parse_shape(const std::string& text) {  // "[320, 4, 3, 3]"
  std::vector<int64_t> shape;
  std::stringstream in(text.substr(1, text.size() - 2));
  std::string part;
  while (std::getline(in, part, ',')) shape.push_back(std::stoll(part));
  return shape;
}

// Every LDM key and shape of a key map (diffusers key, LDM key, shape per line; a fused
// OpenCLIP projection is listed once per third: "in_proj_weight  [rows 0*D:(+1)*D]").
void add_map(io::SafetensorsHeader& header, const std::string& map) {
  std::ifstream in(testing::fixture("single_file/" + map));
  std::string line;
  std::set<std::string> seen;  // q, k and v share one fused key
  while (std::getline(in, line)) {
    std::stringstream fields(line);
    std::string diffusers, ldm, shape;
    std::getline(fields, diffusers, '\t');
    std::getline(fields, ldm, '\t');
    std::getline(fields, shape, '\t');
    std::vector<int64_t> dims = parse_shape(shape);
    if (const auto rows = ldm.find("  [rows ");
        rows != std::string::npos) {  // q, k, v: a third each
      ldm = ldm.substr(0, rows);
      dims[0] *= 3;
    }
    if (seen.insert(ldm).second)
      header.tensors.push_back({ldm, io::SafetensorsDtype::F16, dims, 0, 0});
  }
}

// The SD 2.x text tower as Stability's files hold it: the maps' 23 layers, the 24th that SD 2
// does not use, and the projection (its in_proj rows fused: [3 x 1024, 1024]).
void add_open_clip_extras(io::SafetensorsHeader& header) {
  const std::string layer = "cond_stage_model.model.transformer.resblocks.";
  std::vector<io::TensorEntry> last;
  for (const auto& entry : header.tensors) {
    if (!entry.name.starts_with(layer + "22.")) continue;
    io::TensorEntry copy = entry;
    copy.name = layer + "23." + entry.name.substr((layer + "22.").size());
    last.push_back(copy);
  }
  header.tensors.insert(header.tensors.end(), last.begin(), last.end());
  header.tensors.push_back(
      {"cond_stage_model.model.text_projection", io::SafetensorsDtype::F16, {1024, 1024}, 0, 0});
}

io::SafetensorsHeader sd21_header() {
  io::SafetensorsHeader header;
  add_map(header, "ldm_map_unet_sd21.txt");
  add_map(header, "ldm_map_vae.txt");
  add_map(header, "ldm_map_text_encoder_sd21.txt");
  add_open_clip_extras(header);
  return header;
}

// SD 1.x files hold transformers' CLIP text model under cond_stage_model.transformer.: its keys
// come from the model built at SD 1.5's config.
io::SafetensorsHeader sd15_header() {
  io::SafetensorsHeader header;
  add_map(header, "ldm_map_unet_sd15.txt");
  add_map(header, "ldm_map_vae.txt");
  CLIPTextModel text(CLIPTextConfig::from_json(
      read_json_file(testing::fixture("configs/text_encoder_sd15/config.json"), ExitCode::model),
      "sd15"));
  for (const auto& [key, tensor] : state_dict(*text))
    header.tensors.push_back({"cond_stage_model.transformer." + key, io::SafetensorsDtype::F32,
                              tensor.sizes().vec(), 0, 0});
  return header;
}

json published(const std::string& name) {
  return read_json_file(testing::fixture("configs/" + name + "/config.json"), ExitCode::model);
}

// Every key the published config sets (not null) has the same value in ours, except the keys
// that only record where the file came from.
void expect_same_values(const json& ours, const json& theirs, const std::string& what) {
  for (const auto& [key, value] : theirs.items()) {
    if (key.starts_with("_") || value.is_null() || key == "architectures" || key == "torch_dtype" ||
        key == "transformers_version" || key == "bos_token_id" || key == "eos_token_id")
      continue;
    ASSERT_TRUE(ours.contains(key)) << what << ": no " << key;
    if (value.is_number_float())
      EXPECT_DOUBLE_EQ(ours[key].get<double>(), value.get<double>()) << what << "." << key;
    else
      EXPECT_EQ(ours[key], value) << what << "." << key;
  }
}

TEST(SingleFileConfig, SD21FileBuildsSD21BaseConfigs) {
  const auto configs =
      infer_single_file_configs(sd21_header(), "sd21.safetensors", "", std::nullopt);
  EXPECT_EQ(configs.family, io::CheckpointKind::sd2_single_file);
  EXPECT_EQ(configs.prediction_type, "epsilon");
  expect_same_values(configs.unet, published("unet_sd21_base"), "unet");
  EXPECT_EQ(configs.unet["upcast_attention"], false);
  json vae = published("vae_sd21_base");
  vae["sample_size"] = 512;         // the Hub file says 768 for the 512 model; it changes nothing
  vae["scaling_factor"] = 0.18215;  // absent there: diffusers' default
  expect_same_values(configs.vae, vae, "vae");
  // 23 of the file's 24 OpenCLIP layers: SD 2 conditions on the penultimate one.
  json text = published("text_encoder_sd21");
  expect_same_values(configs.text_encoder, text, "text_encoder");
  EXPECT_EQ(configs.scheduler["_class_name"], "PNDMScheduler");
  EXPECT_EQ(configs.scheduler["prediction_type"], "epsilon");
}

TEST(SingleFileConfig, VPredictionBuildsThe768Model) {
  const auto configs =
      infer_single_file_configs(sd21_header(), "sd21.safetensors", "v_prediction", std::nullopt);
  expect_same_values(configs.unet, published("unet_sd21_768"), "unet");
  EXPECT_EQ(configs.scheduler["prediction_type"], "v_prediction");
  EXPECT_EQ(configs.scheduler["_class_name"], "DDIMScheduler");
  EXPECT_NE(configs.notes.front().find("single_file_prediction_type"), std::string::npos);
}

TEST(SingleFileConfig, SD15FileBuildsSD15Configs) {
  const auto configs =
      infer_single_file_configs(sd15_header(), "sd15.safetensors", "", std::nullopt);
  EXPECT_EQ(configs.family, io::CheckpointKind::sd1_single_file);
  expect_same_values(configs.unet, published("unet_sd15"), "unet");
  expect_same_values(configs.vae, published("vae_sd15"), "vae");
  expect_same_values(configs.text_encoder, published("text_encoder_sd15"), "text_encoder");
}

TEST(SingleFileConfig, ATowerWithoutProjectionKeepsItsLayers) {
  // What sdtrain and diffusers' conversion script write: only the layers SD 2 uses.
  io::SafetensorsHeader header;
  add_map(header, "ldm_map_unet_sd21.txt");
  add_map(header, "ldm_map_vae.txt");
  add_map(header, "ldm_map_text_encoder_sd21.txt");
  const auto configs = infer_single_file_configs(header, "x.safetensors", "", std::nullopt);
  EXPECT_EQ(configs.text_encoder["num_hidden_layers"], 23);
}

TEST(SingleFileConfig, AnArchitectureTheRulesCannotBuildNamesTheFix) {
  io::SafetensorsHeader header = sd21_header();
  for (auto& entry : header.tensors)  // 40 channels: no whole number of 64-channel heads
    if (entry.name == "model.diffusion_model.input_blocks.1.0.out_layers.3.weight")
      entry.shape[0] = 40;
  testing::expect_model_error(
      [&] { infer_single_file_configs(header, "odd.safetensors", "", std::nullopt); },
      {"odd.safetensors", "40 channels", "single_file_config"});
  io::SafetensorsHeader no_mid = sd21_header();
  std::erase_if(no_mid.tensors,
                [](const auto& e) { return e.name.find("middle_block.1.") != std::string::npos; });
  testing::expect_model_error(
      [&] { infer_single_file_configs(no_mid, "nomid.safetensors", "", std::nullopt); },
      {"nomid.safetensors", "middle_block.1.proj_in.weight"});
}

fs::path write_sidecar(const std::string& text) {
  const fs::path file = testing::scratch_dir() / "model.safetensors";
  std::ofstream(testing::scratch_dir() / "model.yaml") << text;
  return file;
}

TEST(SingleFileConfig, TheSidecarSaysVPredictionAndHeads) {
  const auto sidecar = read_ldm_sidecar(write_sidecar(
      "model:\n  params:\n    parameterization: \"v\"\n    scale_factor: 0.13025\n"
      "    unet_config:\n      params:\n        num_heads: -1\n        num_head_channels: 64\n"));
  ASSERT_TRUE(sidecar);
  EXPECT_EQ(sidecar->prediction_type, "v_prediction");
  EXPECT_DOUBLE_EQ(*sidecar->scale_factor, 0.13025);
  EXPECT_FALSE(sidecar->num_heads);
  EXPECT_EQ(sidecar->num_head_channels, 64);
  const auto configs = infer_single_file_configs(sd21_header(), "model.safetensors", "", sidecar);
  EXPECT_EQ(configs.prediction_type, "v_prediction");
  EXPECT_DOUBLE_EQ(configs.vae["scaling_factor"].get<double>(), 0.13025);
  EXPECT_NE(configs.notes.front().find("model.yaml"), std::string::npos);
  // The configuration key wins over the sidecar.
  EXPECT_EQ(infer_single_file_configs(sd21_header(), "model.safetensors", "epsilon", sidecar)
                .prediction_type,
            "epsilon");
}

TEST(SingleFileConfig, NoSidecarAndBadSidecars) {
  EXPECT_FALSE(read_ldm_sidecar(testing::scratch_dir() / "absent.safetensors"));
  testing::expect_model_error([] { read_ldm_sidecar(write_sidecar("model: [unclosed\n")); },
                              {"model.yaml", "not a YAML file"});
  testing::expect_model_error(
      [] { read_ldm_sidecar(write_sidecar("model:\n  params:\n    parameterization: x0\n")); },
      {"model.yaml", "parameterization", "x0"});
}

TEST(SingleFileConfig, TheWrittenSidecarReadsBack) {
  const auto configs =
      infer_single_file_configs(sd21_header(), "m.safetensors", "v_prediction", std::nullopt);
  const std::string text = ldm_sidecar_text(configs.unet, configs.vae, "v_prediction", true);
  EXPECT_NE(text.find("FrozenOpenCLIPEmbedder"), std::string::npos);
  EXPECT_NE(text.find("channel_mult: [1, 2, 4, 4]"), std::string::npos);
  EXPECT_NE(text.find("attention_resolutions: [1, 2, 4]"), std::string::npos);
  const auto sidecar = read_ldm_sidecar(write_sidecar(text));
  ASSERT_TRUE(sidecar);
  EXPECT_EQ(sidecar->prediction_type, "v_prediction");
  EXPECT_EQ(sidecar->num_head_channels, 64);
  EXPECT_DOUBLE_EQ(*sidecar->scale_factor, 0.18215);
  // Built again from the file and the sidecar: the same UNet.
  EXPECT_EQ(infer_single_file_configs(sd21_header(), "m.safetensors", "", sidecar).unet,
            configs.unet);
}

}  // namespace
}  // namespace sdtrain::models
