// models::load_components: the text encoder, UNet and VAE loaded on threads of their own give
// the modules their own loads give, with the caller's thread-local state, and the same error
// for the same faulty folder however the threads interleave.

#include "sdtrain/models/load_components.h"

#include <c10/core/impl/VirtualGuardImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>

#include "sdtrain/io/host_weights.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace fs = std::filesystem;
using namespace sdtrain;

namespace {

fs::path demo_model() { return sdtrain::testing::source_dir() / "configs" / "demo" / "model"; }

// Bit equality of every parameter and buffer, by key, dtype and layout included.
void expect_same_tensors(const torch::nn::Module& loaded, const torch::nn::Module& alone,
                         const std::string& component) {
  const auto expected = models::state_dict(alone);
  const auto got = models::state_dict(loaded);
  ASSERT_EQ(got.size(), expected.size()) << component;
  for (std::size_t i = 0; i < got.size(); ++i) {
    SCOPED_TRACE(component + " " + got[i].first);
    EXPECT_EQ(got[i].first, expected[i].first);
    EXPECT_EQ(got[i].second.dtype(), expected[i].second.dtype());
    EXPECT_EQ(got[i].second.strides(), expected[i].second.strides());
    EXPECT_TRUE(torch::equal(got[i].second, expected[i].second));
  }
}

// A copy of the demo model in `dir` with each named component's weight file replaced by text
// that is no safetensors file.
fs::path model_with_broken(const fs::path& dir, const std::vector<std::string>& components) {
  fs::path model = dir;
  for (const auto& name : components) model += "-" + name;
  fs::copy(demo_model(), model, fs::copy_options::recursive);
  for (const auto& name : components) {
    const fs::path file = name == "text_encoder"
                              ? model / name / "model.safetensors"
                              : model / name / "diffusion_pytorch_model.safetensors";
    EXPECT_TRUE(fs::exists(file)) << file;
    std::ofstream(file, std::ios::trunc) << "not a safetensors file";
  }
  return model;
}

std::string load_error(const fs::path& model) {
  try {
    models::load_components(io::ModelFolder(model), {});
  } catch (const std::exception& error) {
    return error.what();
  }
  return "";
}

}  // namespace

TEST(LoadComponents, EachComponentGetsTheBitsOfItsOwnLoad) {
  // A different dtype per component, as a training run asks (trained UNet in float32, frozen
  // parts in the compute dtype), so that each thread is seen to use its own options.
  const io::ModelFolder folder(demo_model());
  const models::LoadOptions text{torch::kBFloat16, torch::kCPU};
  const models::LoadOptions unet{torch::kFloat, torch::kCPU};
  const models::LoadOptions vae{torch::kHalf, torch::kCPU};
  const models::LoadedComponents loaded = models::load_components(folder, {text, unet, vae, ""});
  expect_same_tensors(*loaded.text_encoder, *models::load_text_encoder(folder, text),
                      "text_encoder");
  expect_same_tensors(*loaded.unet, *models::load_unet(folder, unet), "unet");
  expect_same_tensors(*loaded.vae, *models::load_vae(folder, vae), "vae");
  EXPECT_EQ(loaded.vae->parameters().front().dtype(), torch::kHalf);
}

TEST(LoadComponents, KeptHostWeightsAreFilledFromTheThreadsAndReusedAlike) {
  // A subjects run keeps the base in host memory (io/host_weights.h): the three threads add
  // their components to the one store at once, and the next load reads them from it.
  io::ModelFolder folder(demo_model());
  folder.keep_weights_in_host_memory();
  const models::LoadOptions options{torch::kBFloat16, torch::kCPU};
  const models::LoadedComponents first =
      models::load_components(folder, {options, options, options, ""});
  const models::LoadedComponents second =
      models::load_components(folder, {options, options, options, ""});
  ASSERT_NE(folder.host_weights(), nullptr);
  for (const char* key : {"text_encoder", "unet", "vae"})
    EXPECT_NE(folder.host_weights()->find(key), nullptr) << key;
  const io::ModelFolder direct(demo_model());
  expect_same_tensors(*second.text_encoder, *models::load_text_encoder(direct, options),
                      "text_encoder");
  expect_same_tensors(*second.unet, *models::load_unet(direct, options), "unet");
  expect_same_tensors(*second.vae, *models::load_vae(direct, options), "vae");
  expect_same_tensors(*first.unet, *second.unet, "unet, first against second");
}

TEST(LoadComponents, TheCallersThreadLocalStateHoldsOnEveryThread) {
  // Under inference mode a load makes inference tensors; threads started without the caller's
  // state would make ordinary ones.
  c10::InferenceMode inference;
  const models::LoadedComponents loaded =
      models::load_components(io::ModelFolder(demo_model()), {});
  EXPECT_TRUE(loaded.text_encoder->parameters().front().is_inference());
  EXPECT_TRUE(loaded.unet->parameters().front().is_inference());
  EXPECT_TRUE(loaded.vae->parameters().front().is_inference());
}

TEST(LoadComponents, TheErrorNamesTheFirstBrokenComponentInAFixedOrder) {
  // Text encoder, then UNet, then VAE, whichever thread fails first: run several times, since
  // the VAE (the smallest) usually fails first in time.
  const fs::path dir = sdtrain::testing::scratch_dir() / "broken";
  const fs::path unet_and_vae = model_with_broken(dir, {"unet", "vae"});
  for (int run = 0; run < 5; ++run) {
    const std::string error = load_error(unet_and_vae);
    EXPECT_NE(error.find("/unet/diffusion_pytorch_model"), std::string::npos) << error;
  }
  const fs::path all = model_with_broken(dir, {"text_encoder", "unet", "vae"});
  for (int run = 0; run < 5; ++run) {
    const std::string error = load_error(all);
    EXPECT_NE(error.find("/text_encoder/model.safetensors"), std::string::npos) << error;
  }
  const fs::path vae = model_with_broken(dir, {"vae"});
  EXPECT_NE(load_error(vae).find("/vae/diffusion_pytorch_model"), std::string::npos);
}

TEST(LoadComponentsOnCuda, EachThreadStagesItsComponentToTheGpuAndIsDoneOnReturn) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  // Three staging rings at once, their copies on the device's one stream: each component must
  // still get the host cast's bits, and nothing may be queued when the call returns.
  const io::ModelFolder folder(demo_model());
  const torch::Device cuda(torch::kCUDA);
  const models::LoadOptions text{torch::kFloat, cuda};
  const models::LoadOptions half{torch::kHalf, cuda};
  const models::LoadedComponents loaded = models::load_components(folder, {text, half, half, ""});
  const c10::impl::VirtualGuardImpl guard(c10::DeviceType::CUDA);
  EXPECT_TRUE(guard.queryStream(guard.getStream(cuda)))
      << "load_components returned with copies still queued";
  const auto on_host = [&](const torch::nn::Module& module) {
    auto tensors = models::state_dict(module);
    for (auto& [key, tensor] : tensors) tensor = tensor.cpu();
    return tensors;
  };
  const models::LoadOptions text_host{torch::kFloat, torch::kCPU};
  const models::LoadOptions half_host{torch::kHalf, torch::kCPU};
  const auto expect_host_bits = [&](const torch::nn::Module& on_gpu, const torch::nn::Module& alone,
                                    const std::string& name) {
    const auto got = on_host(on_gpu);
    const auto expected = models::state_dict(alone);
    ASSERT_EQ(got.size(), expected.size()) << name;
    for (std::size_t i = 0; i < got.size(); ++i)
      EXPECT_TRUE(torch::equal(got[i].second, expected[i].second)) << name << " " << got[i].first;
  };
  expect_host_bits(*loaded.text_encoder, *models::load_text_encoder(folder, text_host),
                   "text_encoder");
  expect_host_bits(*loaded.unet, *models::load_unet(folder, half_host), "unet");
  expect_host_bits(*loaded.vae, *models::load_vae(folder, half_host), "vae");
}
