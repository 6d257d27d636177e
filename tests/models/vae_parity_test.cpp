// AutoencoderKL against diffusers on the tiny 4-level VAE of tools/make_unet_vae_fixtures.py,
// fp32 on CPU: posterior moments, a seeded posterior sample, decoding; the legacy attention
// key names; config handling; the real SD VAE's parameter total and keys.
//
// Tolerance: max|ours - ref| <= 1e-5 * max|ref|, as for the UNet (same kernels, same order;
// differences are fp32 reduction rounding, measured ~1e-7, see docs/models.md). The seeded
// sample's noise is drawn by the same ATen generator code, so it is compared the same way
// (the noise itself is bitwise identical; mean/std carry the encoder's rounding).

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <filesystem>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "unet_vae_support.h"

using namespace sdtrain;
using namespace sdtrain::models;
using sdtrain::testing::describe;
using sdtrain::testing::difference;
namespace fs = std::filesystem;

namespace {

constexpr double kTolerance = 1e-5;  // relative to max|ref|, see the file comment

void expect_close(const torch::Tensor& actual, const torch::Tensor& expected, const std::string& what) {
  auto d = difference(actual, expected);
  std::cout << "[ measured ] vae " << what << ": " << d.max_abs << " abs, " << d.relative() << " relative\n";
  EXPECT_GT(d.max_ref, 1e-3) << what << ": reference is degenerate";
  EXPECT_LE(d.max_abs, kTolerance * d.max_ref) << what << ": " << describe(d);
}

TEST(VAEParity, EncodeSampleDecodeMatchDiffusers) {
  auto vae = load_vae(sdtrain::testing::model_fixture("vae"), LoadOptions{});
  auto io = sdtrain::testing::read_fixture_tensors("vae_io.safetensors");
  torch::NoGradGuard no_grad;
  vae->eval();
  DiagonalGaussianDistribution posterior = vae->encode(io.at("x"));
  expect_close(posterior.mean, io.at("mean"), "mean");
  expect_close(posterior.logvar, io.at("logvar"), "logvar");
  expect_close(posterior.std, io.at("std"), "std");
  EXPECT_TRUE(torch::equal(posterior.mode(), posterior.mean));

  // torch.Generator().manual_seed(1234) in the reference.
  auto generator = at::make_generator<at::CPUGeneratorImpl>(1234);
  torch::Tensor latents = posterior.sample(generator);
  expect_close(latents, io.at("sample_seed1234"), "sample(seed 1234)");
  // The noise itself: (sample - mean) / std recovers it to rounding on both sides.
  torch::Tensor noise = at::randn(posterior.mean.sizes(), at::make_generator<at::CPUGeneratorImpl>(1234));
  expect_close((io.at("sample_seed1234") - io.at("mean")) / io.at("std"), noise, "noise drawn like torch.randn");

  expect_close(vae->decode(latents), io.at("decoded"), "decode(sample)");
  expect_close(vae->decode(posterior.mode()), io.at("decoded_mode"), "decode(mode)");
  expect_close(vae(io.at("x")), io.at("decoded_mode"), "forward (mode)");
}

TEST(VAEParity, LegacyAttentionNamesLoadTheSameWeights) {
  auto current = load_vae(sdtrain::testing::model_fixture("vae"), LoadOptions{});
  auto legacy = load_vae(sdtrain::testing::model_fixture("vae_legacy"), LoadOptions{});
  io::SafetensorsFile legacy_file(sdtrain::testing::model_fixture("vae_legacy/diffusion_pytorch_model.safetensors"));
  ASSERT_NE(legacy_file.find("encoder.mid_block.attentions.0.query.weight"), nullptr) << "fixture lacks legacy names";
  auto a = current->named_parameters(), b = legacy->named_parameters();
  ASSERT_EQ(a.size(), b.size());
  for (const auto& item : a) EXPECT_TRUE(torch::equal(item.value(), b[item.key()])) << item.key();
}

TEST(VAEKeys, LegacyMapping) {
  EXPECT_EQ(vae_key_mapper("decoder.mid_block.attentions.0.query.weight"), "decoder.mid_block.attentions.0.to_q.weight");
  EXPECT_EQ(vae_key_mapper("decoder.mid_block.attentions.0.key.bias"), "decoder.mid_block.attentions.0.to_k.bias");
  EXPECT_EQ(vae_key_mapper("encoder.mid_block.attentions.0.value.weight"), "encoder.mid_block.attentions.0.to_v.weight");
  EXPECT_EQ(vae_key_mapper("encoder.mid_block.attentions.0.proj_attn.bias"), "encoder.mid_block.attentions.0.to_out.0.bias");
  EXPECT_EQ(vae_key_mapper("encoder.mid_block.attentions.0.to_q.weight"), "encoder.mid_block.attentions.0.to_q.weight");
  EXPECT_EQ(vae_key_mapper("encoder.mid_block.attentions.0.group_norm.weight"), "encoder.mid_block.attentions.0.group_norm.weight");
  EXPECT_EQ(vae_key_mapper("decoder.up_blocks.0.resnets.0.conv1.weight"), "decoder.up_blocks.0.resnets.0.conv1.weight");
}

using sdtrain::testing::expect_model_error;

fs::path edited_vae(const std::string& fixture_name, const std::function<void(io::NamedTensors&)>& edit) {
  return sdtrain::testing::edited_copy(sdtrain::testing::model_fixture(fixture_name),
                                       "diffusion_pytorch_model.safetensors", edit);
}

TEST(VAELoader, MissingLegacyTensorIsNamed) {
  fs::path dir = edited_vae("vae_legacy", [](io::NamedTensors& t) {
    t.erase(std::remove_if(t.begin(), t.end(), [](const auto& p) { return p.first == "decoder.mid_block.attentions.0.proj_attn.weight"; }),
            t.end());
  });
  // Reported under the module's key (what the model needs).
  expect_model_error([&] { load_vae(dir, LoadOptions{}); }, {"missing", "decoder.mid_block.attentions.0.to_out.0.weight"});
}

TEST(VAELoader, BothNamingSchemesAtOnceAreRejected) {
  fs::path dir = edited_vae("vae", [](io::NamedTensors& t) {
    torch::Tensor q;
    for (const auto& [key, value] : t) {
      if (key == "encoder.mid_block.attentions.0.to_q.weight") q = value;
    }
    t.emplace_back("encoder.mid_block.attentions.0.query.weight", q);
  });
  // query.weight maps onto to_q.weight, which the file also has: the loader reports the key
  // given twice rather than silently picking one.
  expect_model_error([&] { load_vae(dir, LoadOptions{}); }, {"given twice", "encoder.mid_block.attentions.0."});
}

TEST(VAELoader, WrongShapeIsNamed) {
  fs::path dir = edited_vae("vae", [](io::NamedTensors& t) {
    for (auto& [key, value] : t) {
      if (key == "quant_conv.weight") value = torch::zeros({8, 8, 3, 3});
    }
  });
  expect_model_error([&] { load_vae(dir, LoadOptions{}); }, {"quant_conv.weight", "expected [8, 8, 1, 1]", "found [8, 8, 3, 3]"});
}

nlohmann::json real_vae_config(const std::string& name) {
  return read_json_file(sdtrain::testing::fixture("configs/" + name + "/config.json"), ExitCode::model);
}

TEST(VAEConfig, ScalingFactorDefaultAndUnsupportedValues) {
  auto sd21 = AutoencoderKLConfig::from_json(real_vae_config("vae_sd21_base"));
  EXPECT_DOUBLE_EQ(sd21.scaling_factor, 0.18215);  // key absent in SD 2.1's file
  EXPECT_EQ(sd21.block_out_channels, (std::vector<int64_t>{128, 256, 512, 512}));
  EXPECT_EQ(sd21.layers_per_block, 2);
  auto custom = real_vae_config("vae_sd15");
  custom["scaling_factor"] = 0.13025;
  EXPECT_DOUBLE_EQ(AutoencoderKLConfig::from_json(custom).scaling_factor, 0.13025);

  const std::vector<std::pair<std::string, nlohmann::json>> cases = {
      {"act_fn", "relu"},
      {"down_block_types", {"DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"}},
      {"up_block_types", {"UpDecoderBlock2D"}},
      {"latents_mean", {0.0, 0.0, 0.0, 0.0}},
      {"norm_num_groups", 7},
  };
  for (const auto& [key, value] : cases) {
    auto json = real_vae_config("vae_sd21_base");
    json[key] = value;
    SCOPED_TRACE(key + " = " + value.dump());
    expect_model_error([&] { AutoencoderKLConfig::from_json(json, "vae/config.json"); }, {"vae/config.json", key});
  }
}

TEST(VAERealConfig, ParameterTotalAndKeys) {
  AutoencoderKL vae(AutoencoderKLConfig::from_json(real_vae_config("vae_sd21_base")));
  EXPECT_EQ(parameter_count(*vae), 83'653'863);
  auto expected = sdtrain::testing::read_key_list("keys_vae.txt");
  std::size_t seen = 0;
  for (const auto& item : vae->named_parameters()) {
    auto it = expected.find(item.key());
    if (it == expected.end()) {
      ADD_FAILURE() << "unexpected parameter " << item.key();
      continue;
    }
    EXPECT_EQ(sdtrain::testing::shape_text(item.value().sizes()), it->second) << item.key();
    ++seen;
  }
  EXPECT_EQ(seen, expected.size());
}

}  // namespace
