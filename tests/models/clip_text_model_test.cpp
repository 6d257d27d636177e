// CLIPTextModel against transformers: forward outputs, clip_skip outputs and every parameter
// gradient of a fixed loss, on the tiny fixtures that tools/make_text_encoder_fixtures.py writes
// (references computed in float64 from the stored float32 weights); strict loading; config
// validation; parameter totals at the real SD 2.1 and SD 1.5 configs.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::models;
namespace fs = std::filesystem;

namespace {

const char* const kRegenerate =
    "\n  (if the fixtures are stale, regenerate them with "
    "`~/.cache/sdtrain/venv/bin/python tools/make_text_encoder_fixtures.py`)";

// Tolerances, as max |ours - reference| / scale, fp32 on CPU. The float32 transformers model
// misses the float64 reference by 4.5e-7 (outputs) and 9e-7 (gradients) on these fixtures (the
// generator prints both); 1e-5 leaves >10x headroom for a different summation order, while real
// defects miss by 1e-3 or more (ToleranceSeparatesDefects checks two subtle ones).
constexpr double kOutputTolerance = 1e-5;
constexpr double kGradientTolerance = 1e-5;

fs::path model_fixture(const std::string& name) { return sdtrain::testing::fixture("models/" + name); }

// max |ours - ref| / max |ref|: the error relative to the output's scale.
double scaled_error(const torch::Tensor& ours, const torch::Tensor& ref) {
  auto r = ref.to(torch::kDouble);
  return ((ours.detach().to(torch::kDouble) - r).abs().max() / r.abs().max()).item<double>();
}

CLIPTextModel load(const std::string& name, LoadOptions options = {}) {
  return load_text_encoder(io::ModelFolder(model_fixture(name)), options);
}

// Checks every output the fixture holds for the input case: last_hidden_state and each clip_skip.
void expect_forward_matches(const std::string& name, const std::string& input_case, const std::vector<int64_t>& skips,
                            double tolerance = kOutputTolerance, c10::ScalarType dtype = torch::kFloat) {
  auto model = load(name, LoadOptions{dtype, torch::kCPU});
  io::SafetensorsFile reference(model_fixture(name) / "reference.safetensors");
  auto ids = reference.tensor("input_ids." + input_case);
  torch::NoGradGuard no_grad;
  double error = scaled_error(model(ids), reference.tensor("last_hidden_state." + input_case));
  EXPECT_LT(error, tolerance) << name << " last_hidden_state." << input_case << kRegenerate;
  double worst = error;
  for (int64_t k : skips) {
    auto key = "clip_skip" + std::to_string(k) + "." + input_case;
    error = scaled_error(model(ids, k), reference.tensor(key));
    EXPECT_LT(error, tolerance) << name << " " << key << kRegenerate;
    worst = std::max(worst, error);
  }
  std::cout << "  measured: " << name << " " << input_case << " (" << c10::toString(dtype)
            << ") worst output error " << worst << " (tolerance " << tolerance << ")\n";
}

void expect_gradients_match(const std::string& name) {
  auto model = load(name);
  io::SafetensorsFile reference(model_fixture(name) / "reference.safetensors");
  auto ids = reference.tensor(reference.metadata().at("grad_input"));
  auto loss = (model(ids) * reference.tensor("loss_weight")).sum();
  loss.backward();
  EXPECT_LT(scaled_error(loss.reshape({1}), reference.tensor("loss")), kOutputTolerance) << name << kRegenerate;

  // Scale per tensor as in the generator: its largest entry, floored at 1% of the largest entry
  // of any gradient, since the key-projection biases have an exactly zero gradient (softmax is
  // unchanged by a constant added to every key) and only rounding noise remains there.
  double floor = 0.0;
  for (const auto& p : model->named_parameters()) {
    floor = std::max(floor, 0.01 * reference.tensor("grad." + p.key()).abs().max().item<double>());
  }
  std::size_t grads_in_fixture = 0;
  for (const auto& entry : reference.tensors()) grads_in_fixture += entry.name.starts_with("grad.");
  EXPECT_EQ(grads_in_fixture, model->parameters().size()) << name << kRegenerate;
  double worst = 0.0;
  for (const auto& p : model->named_parameters()) {
    ASSERT_TRUE(p.value().grad().defined()) << p.key() << " received no gradient";
    auto ref = reference.tensor("grad." + p.key()).to(torch::kDouble);
    double scale = std::max(ref.abs().max().item<double>(), floor);
    double error = (p.value().grad().to(torch::kDouble) - ref).abs().max().item<double>() / scale;
    EXPECT_LT(error, kGradientTolerance) << name << " gradient of " << p.key() << kRegenerate;
    worst = std::max(worst, error);
  }
  std::cout << "  measured: " << name << " worst gradient error " << worst << " (tolerance " << kGradientTolerance
            << ")\n";
}

using sdtrain::testing::expect_model_error;

// A writable copy of a fixture folder whose text encoder weights are edited by `edit`.
fs::path edited_copy(const std::string& name, const std::function<void(io::NamedTensors&)>& edit) {
  return sdtrain::testing::edited_copy(model_fixture(name), "text_encoder/model.safetensors", edit);
}

nlohmann::json sd21_config() {
  std::ifstream in(sdtrain::testing::fixture("configs/text_encoder_sd21/config.json"));
  return nlohmann::json::parse(in);
}

}  // namespace

TEST(CLIPTextModelParity, SD2TinyForwardMatchesReference) {
  expect_forward_matches("clip_text_sd2_tiny", "sd2_padding", {1});
  expect_forward_matches("clip_text_sd2_tiny", "short", {});  // L = 16 < max_position_embeddings
}

TEST(CLIPTextModelParity, SD15TinyForwardMatchesReference) {
  expect_forward_matches("clip_text_sd15_tiny", "sd15_padding", {1, 2});
}

TEST(CLIPTextModelParity, SD2TinyGradientsMatchReference) { expect_gradients_match("clip_text_sd2_tiny"); }

TEST(CLIPTextModelParity, SD15TinyGradientsMatchReference) { expect_gradients_match("clip_text_sd15_tiny"); }

TEST(CLIPTextModelParity, Float64LoadMatchesReferenceClosely) {
  // LoadOptions::dtype is honoured, and in float64 the only error left is the fixture's own
  // rounding to float32 (about 6e-8 relative).
  auto model = load("clip_text_sd15_tiny", LoadOptions{torch::kDouble, torch::kCPU});
  for (const auto& p : model->parameters()) ASSERT_EQ(p.scalar_type(), torch::kDouble);
  expect_forward_matches("clip_text_sd15_tiny", "sd15_padding", {1, 2}, 2e-7, torch::kDouble);
}

TEST(CLIPTextModelParity, ToleranceSeparatesDefects) {
  // The tolerance above would catch a swapped activation or an ignored layer_norm_eps: both
  // change the output by far more than it.
  io::ModelFolder folder(model_fixture("clip_text_sd2_tiny"));
  io::SafetensorsFile reference(model_fixture("clip_text_sd2_tiny") / "reference.safetensors");
  auto ids = reference.tensor("input_ids.sd2_padding");
  auto expected = reference.tensor("last_hidden_state.sd2_padding");
  auto config = CLIPTextConfig::from_json(folder.config("text_encoder"), "text_encoder/config.json");
  auto defective = config;
  defective.hidden_act = CLIPActivation::quick_gelu;
  std::vector<CLIPTextConfig> variants = {defective};
  defective = config;
  defective.layer_norm_eps = 1e-6;
  variants.push_back(defective);
  for (const auto& variant : variants) {
    CLIPTextModel model(variant);
    load_state_dict(*model, folder.weights("text_encoder"), {}, map_text_encoder_key);
    torch::NoGradGuard no_grad;
    EXPECT_GT(scaled_error(model(ids), expected), 100 * kOutputTolerance)
        << to_string(variant.hidden_act) << " eps " << variant.layer_norm_eps;
  }
}

TEST(CLIPTextModel, AttentionIsCausal) {
  // Changing the tokens from position 10 on leaves positions 0..9 untouched: what makes the
  // SD 1.5 and SD 2 padding choices give the same embeddings up to <|endoftext|>.
  auto model = load("clip_text_sd2_tiny");
  auto ids = torch::randint(0, 1512, {1, 77}, torch::kLong);
  auto changed = ids.clone();
  changed.index_put_({0, torch::indexing::Slice(10)}, 0);
  torch::NoGradGuard no_grad;
  auto a = model(ids), b = model(changed);
  auto head = torch::indexing::Slice(0, 10), tail = torch::indexing::Slice(10);
  EXPECT_LT(scaled_error(b.index({0, head}), a.index({0, head})), 1e-6);
  EXPECT_GT(scaled_error(b.index({0, tail}), a.index({0, tail})), 1e-2);
}

TEST(CLIPTextModel, ClipSkipOutOfRangeIsAConfigError) {
  auto model = load("clip_text_sd2_tiny");  // 2 layers: clip_skip 0..2
  auto ids = torch::zeros({1, 77}, torch::kLong);
  EXPECT_THROW(model(ids, 3), ConfigError);
  EXPECT_THROW(model(ids, -1), ConfigError);
  EXPECT_NO_THROW(model(ids, 2));
}

TEST(CLIPTextModelLoading, LegacyPositionIdsAreIgnored) {
  // Same weights as clip_text_sd15_tiny plus text_model.embeddings.position_ids [1, 77] int64.
  io::SafetensorsFile legacy(model_fixture("clip_text_sd15_tiny_legacy") / "text_encoder" / "model.safetensors");
  ASSERT_NE(legacy.find("text_model.embeddings.position_ids"), nullptr) << kRegenerate;
  auto with_legacy = load("clip_text_sd15_tiny_legacy");
  auto plain = load("clip_text_sd15_tiny");
  auto expected = state_dict(*plain);
  auto loaded = state_dict(*with_legacy);
  ASSERT_EQ(loaded.size(), expected.size());
  for (std::size_t i = 0; i < loaded.size(); ++i) {
    EXPECT_EQ(loaded[i].first, expected[i].first);
    EXPECT_TRUE(torch::equal(loaded[i].second, expected[i].second)) << loaded[i].first;
  }
  for (const auto& [key, value] : loaded) EXPECT_EQ(key.find("position_ids"), std::string::npos);
  io::SafetensorsFile reference(model_fixture("clip_text_sd15_tiny") / "reference.safetensors");
  torch::NoGradGuard no_grad;
  EXPECT_LT(scaled_error(with_legacy(reference.tensor("input_ids.sd15_padding")),
                         reference.tensor("last_hidden_state.sd15_padding")),
            kOutputTolerance)
      << kRegenerate;
}

TEST(CLIPTextModelLoading, AcceptsBothKeyLayouts) {
  // The SD 2 fixture was written by transformers >= 5 (no text_model. prefix), the SD 1.5 one in
  // the Hub layout; both load to modules whose keys carry the prefix.
  io::SafetensorsFile unprefixed(model_fixture("clip_text_sd2_tiny") / "text_encoder" / "model.safetensors");
  io::SafetensorsFile prefixed(model_fixture("clip_text_sd15_tiny") / "text_encoder" / "model.safetensors");
  EXPECT_NE(unprefixed.find("final_layer_norm.weight"), nullptr);
  EXPECT_NE(prefixed.find("text_model.final_layer_norm.weight"), nullptr);
  EXPECT_EQ(map_text_encoder_key("final_layer_norm.weight"), "text_model.final_layer_norm.weight");
  EXPECT_EQ(map_text_encoder_key("text_model.final_layer_norm.weight"), "text_model.final_layer_norm.weight");
  EXPECT_EQ(map_text_encoder_key("embeddings.position_ids"), std::nullopt);
  auto sd2 = load("clip_text_sd2_tiny");
  EXPECT_TRUE(torch::equal(sd2->text_model->final_layer_norm->weight, unprefixed.tensor("final_layer_norm.weight")));
}

TEST(CLIPTextModelLoading, LoadsTheBundledDemoModel) {
  // configs/demo/model is what `sdtrain` trains in the demo; its text encoder was written by
  // transformers' own save_pretrained (tools/make_tiny_model.py).
  auto model = load_text_encoder(io::ModelFolder(sdtrain::testing::source_dir() / "configs/demo/model"));
  EXPECT_EQ(model->config().hidden_act, CLIPActivation::gelu);
  EXPECT_EQ(model->config().hidden_size, 32);
  torch::NoGradGuard no_grad;
  auto out = model(torch::zeros({2, 77}, torch::kLong));
  EXPECT_EQ(out.sizes(), (std::vector<int64_t>{2, 77, 32}));
  // Not degenerate: the final layer norm (weight 1, bias 0 in this model) leaves unit spread.
  EXPECT_GT(out.std().item<double>(), 0.1);
}

TEST(CLIPTextModelLoading, MissingTensorIsNamed) {
  auto dir = edited_copy("clip_text_sd15_tiny", [](io::NamedTensors& tensors) {
    std::erase_if(tensors, [](const auto& t) { return t.first == "text_model.encoder.layers.1.mlp.fc2.bias"; });
  });
  expect_model_error([&] { load_text_encoder(io::ModelFolder(dir)); },
                     {"missing", "text_model.encoder.layers.1.mlp.fc2.bias", "model.safetensors"});
}

TEST(CLIPTextModelLoading, WrongShapeIsNamed) {
  auto dir = edited_copy("clip_text_sd15_tiny", [](io::NamedTensors& tensors) {
    for (auto& [name, tensor] : tensors) {
      if (name == "text_model.encoder.layers.2.self_attn.q_proj.weight") tensor = torch::zeros({24, 25});
    }
  });
  expect_model_error([&] { load_text_encoder(io::ModelFolder(dir)); },
                     {"text_model.encoder.layers.2.self_attn.q_proj.weight", "[24, 24]", "[24, 25]"});
}

TEST(CLIPTextModelLoading, UnexpectedTensorIsNamed) {
  // A fourth layer in the weights but three in config.json, e.g. a config from another model.
  auto dir = edited_copy("clip_text_sd15_tiny", [](io::NamedTensors& tensors) {
    tensors.emplace_back("text_model.encoder.layers.3.mlp.fc1.bias", torch::zeros({48}));
  });
  expect_model_error([&] { load_text_encoder(io::ModelFolder(dir)); },
                     {"unexpected", "text_model.encoder.layers.3.mlp.fc1.bias"});
}

TEST(CLIPTextConfig, ParsesTheRealConfigs) {
  auto sd21 = CLIPTextConfig::from_file(sdtrain::testing::fixture("configs/text_encoder_sd21/config.json"));
  EXPECT_EQ(sd21.hidden_size, 1024);
  EXPECT_EQ(sd21.num_hidden_layers, 23);
  EXPECT_EQ(sd21.head_dim(), 64);
  EXPECT_EQ(sd21.hidden_act, CLIPActivation::gelu);
  EXPECT_DOUBLE_EQ(sd21.layer_norm_eps, 1e-5);
  auto sd15 = CLIPTextConfig::from_file(sdtrain::testing::fixture("configs/text_encoder_sd15/config.json"));
  EXPECT_EQ(sd15.hidden_size, 768);
  EXPECT_EQ(sd15.intermediate_size, 3072);
  EXPECT_EQ(sd15.hidden_act, CLIPActivation::quick_gelu);
  // transformers' default activation when the key is absent is quick_gelu, not gelu.
  auto without_act = sd21_config();
  without_act.erase("hidden_act");
  EXPECT_EQ(CLIPTextConfig::from_json(without_act, "test").hidden_act, CLIPActivation::quick_gelu);
}

TEST(CLIPTextConfig, UnsupportedValuesAreNamed) {
  struct Case {
    const char* key;
    nlohmann::json value;
    std::string shown;
  };
  std::vector<Case> cases = {
      {"hidden_act", "relu", "relu"},
      {"hidden_act", "gelu_new", "gelu_new"},
      {"num_attention_heads", 15, "15"},  // 1024 is not divisible by 15
      {"hidden_size", "1024", "\"1024\""},
      {"num_hidden_layers", 0, "0"},
      {"layer_norm_eps", -1.0, "-1"},
      {"attention_dropout", 0.1, "0.1"},
      {"model_type", "clip", "clip"},
      {"architectures", nlohmann::json::array({"CLIPTextModelWithProjection"}), "CLIPTextModelWithProjection"},
  };
  for (const auto& c : cases) {
    auto json = sd21_config();
    json[c.key] = c.value;
    SCOPED_TRACE(std::string(c.key) + " = " + c.value.dump());
    expect_model_error([&] { CLIPTextConfig::from_json(json, "text_encoder/config.json"); },
                       {std::string("\"") + c.key + "\"", c.shown, "text_encoder/config.json"});
  }
}

TEST(CLIPTextConfig, UnsupportedConfigInAFolderNamesFileAndKey) {
  auto dir = sdtrain::testing::scratch_dir() / "folder";
  fs::copy(model_fixture("clip_text_sd15_tiny"), dir, fs::copy_options::recursive);
  auto path = dir / "text_encoder" / "config.json";
  nlohmann::json json;
  std::ifstream(path) >> json;
  json["hidden_act"] = "silu";
  std::ofstream(path) << json.dump(2);
  expect_model_error([&] { load_text_encoder(io::ModelFolder(dir)); },
                     {"hidden_act", "silu", path.string()});
}

namespace {

// Builds the model at a real config (random init, nothing loaded) and checks its keys and
// shapes against the reference key list, then the parameter total.
void expect_real_config(const std::string& name, std::size_t tensors, int64_t parameters) {
  auto config = CLIPTextConfig::from_file(sdtrain::testing::fixture("configs/" + name + "/config.json"));
  CLIPTextModel model(config);
  std::map<std::string, std::string> expected;
  std::ifstream keys(sdtrain::testing::fixture("configs/" + name + "/keys.txt"));
  for (std::string line; std::getline(keys, line);) {
    auto tab = line.find('\t');
    if (tab != std::string::npos) expected[line.substr(0, tab)] = line.substr(tab + 1);
  }
  std::map<std::string, std::string> actual;
  for (const auto& [key, value] : state_dict(*model)) {
    std::ostringstream shape;
    shape << value.sizes();
    actual[key] = shape.str();
  }
  EXPECT_EQ(expected.size(), tensors);
  EXPECT_EQ(actual, expected);
  EXPECT_EQ(parameter_count(*model), parameters);
}

}  // namespace

TEST(CLIPTextModelTotals, SD21TextEncoder) { expect_real_config("text_encoder_sd21", 372, 340'387'840); }

TEST(CLIPTextModelTotals, SD15TextEncoder) { expect_real_config("text_encoder_sd15", 196, 123'060'480); }
