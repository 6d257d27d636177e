// EMAModel against diffusers' training_utils.EMAModel (tests/fixtures/train/ema.safetensors,
// written by tools/make_lr_ema_fixtures.py): 10 steps on three float32 parameters, one frozen,
// with EMAModel's defaults and with warm-up, update_after_step and both decay clamps.
//
// Tolerance: max|ours - diffusers| <= 1e-6 x max|ref| per tensor (float32 round-off of a few
// operations). The update runs the same float32 operations in the same order as diffusers', so
// the measured difference is 0; the decay, a double, is compared to 4 ulp.

#include "sdtrain/train/ema.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <iostream>
#include <map>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/error.h"
#include "sync_debug.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::train;

namespace {

constexpr double kTolerance = 1e-6;  // relative to max|ref|, see the file comment
constexpr int kSteps = 10;
const char* kNames[] = {"conv.weight", "conv.bias", "frozen"};

struct Conv : torch::nn::Module {
  Conv() {
    register_parameter("weight", torch::zeros({4, 3, 2}));
    register_parameter("bias", torch::zeros({5}));
  }
};

// Parameters named as the fixture's: conv.weight, conv.bias, and frozen (no gradient).
struct Net : torch::nn::Module {
  Net() {
    register_parameter("frozen", torch::zeros({2, 3}), /*requires_grad=*/false);
    register_module("conv", std::make_shared<Conv>());
  }
};

std::map<std::string, torch::Tensor> read_fixture() {
  auto path = sdtrain::testing::fixture("train/ema.safetensors");
  EXPECT_TRUE(std::filesystem::exists(path))
      << path << " is missing; regenerate it with\n"
      << "  ~/.cache/sdtrain/venv/bin/python tools/make_lr_ema_fixtures.py";
  io::SafetensorsFile file(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& entry : file.tensors()) out.emplace(entry.name, file.tensor(entry.name).clone());
  return out;
}

void set_parameters(torch::nn::Module& module, const std::map<std::string, torch::Tensor>& fixture,
                    const std::string& run, int step) {
  torch::NoGradGuard no_grad;
  auto parameters = module.named_parameters();
  for (const char* name : kNames) {
    parameters[name].copy_(fixture.at(run + ".param." + name + "." + std::to_string(step)));
  }
}

const torch::Tensor& shadow_of(const EMAModel& ema, const std::string& name) {
  for (const auto& [key, value] : ema.shadow()) {
    if (key == name) return value;
  }
  throw std::out_of_range(name);
}

EMAOptions warmup_options() {  // the fixture's "warmup" run
  EMAOptions o;
  o.decay = 0.6;
  o.min_decay = 0.3;
  o.update_after_step = 2;
  o.use_ema_warmup = true;
  o.inv_gamma = 2.0;
  o.power = 0.75;
  return o;
}

}  // namespace

TEST(EMA, StepsMatchDiffusersEMAModel) {
  auto fixture = read_fixture();
  for (const auto& [run, options] :
       {std::pair<std::string, EMAOptions>{"defaults", EMAOptions{}},
        std::pair<std::string, EMAOptions>{"warmup", warmup_options()}}) {
    Net net;
    set_parameters(net, fixture, run, 0);
    EMAModel ema(net, options);
    auto decays = fixture.at(run + ".decay");
    double worst = 0;
    for (int k = 1; k <= kSteps; ++k) {
      set_parameters(net, fixture, run, k);
      ema.step(net);
      EXPECT_EQ(ema.optimization_step(), k);
      EXPECT_DOUBLE_EQ(ema.current_decay(), decays[k - 1].item<double>()) << run << " step " << k;
      for (const char* name : kNames) {
        auto expected = fixture.at(run + ".shadow." + name + "." + std::to_string(k));
        const auto& actual = shadow_of(ema, name);
        ASSERT_EQ(actual.sizes(), expected.sizes());
        double diff = (actual - expected).abs().max().item<double>();
        worst = std::max(worst, diff);
        EXPECT_LE(diff, kTolerance * expected.abs().max().item<double>())
            << run << " step " << k << " " << name;
      }
      // A parameter without a gradient is copied, not averaged.
      EXPECT_TRUE(torch::equal(shadow_of(ema, "frozen"),
                               fixture.at(run + ".param.frozen." + std::to_string(k))));
    }
    std::cout << "[ measured ] EMA " << run << ": max|ours - diffusers| = " << worst << "\n";
  }
}

TEST(EMA, DecayFollowsGetDecay) {
  EMAOptions defaults;
  EXPECT_EQ(ema_decay_at(defaults, 1), 0.0);  // the first step copies the parameters
  EXPECT_DOUBLE_EQ(ema_decay_at(defaults, 2), 2.0 / 11.0);
  EXPECT_DOUBLE_EQ(ema_decay_at(defaults, 100), 100.0 / 109.0);
  EXPECT_EQ(ema_decay_at(defaults, 10'000'000), 0.9999);  // capped at decay
  EMAOptions floor = defaults;
  floor.min_decay = 0.5;
  EXPECT_EQ(ema_decay_at(floor, 1), 0.0);  // diffusers returns before the min_decay clamp
  EXPECT_EQ(ema_decay_at(floor, 2), 0.5);
}

TEST(EMA, SaveLoadContinuesAsAnUninterruptedRun) {
  auto fixture = read_fixture();
  const std::string run = "warmup";
  Net net;
  set_parameters(net, fixture, run, 0);
  EMAModel uninterrupted(net, warmup_options());
  EMAModel first_half(net, warmup_options());
  for (int k = 1; k <= 5; ++k) {
    set_parameters(net, fixture, run, k);
    uninterrupted.step(net);
    first_half.step(net);
  }
  auto path = sdtrain::testing::scratch_dir() / "ema.safetensors";
  first_half.save(path);
  EXPECT_EQ(io::SafetensorsFile(path).metadata().at("ema_optimization_step"), "5");

  Net fresh;  // a resumed process: different starting values, the state comes from the file
  EMAModel resumed(fresh, warmup_options());
  resumed.load(path);
  EXPECT_EQ(resumed.optimization_step(), 5);
  for (int k = 6; k <= kSteps; ++k) {
    set_parameters(net, fixture, run, k);
    uninterrupted.step(net);
    resumed.step(net);
  }
  EXPECT_EQ(resumed.optimization_step(), uninterrupted.optimization_step());
  for (const char* name : kNames) {
    EXPECT_TRUE(torch::equal(shadow_of(resumed, name), shadow_of(uninterrupted, name))) << name;
  }
}

TEST(EMA, StoreCopyToRestoreSwapsTheWeightsForValidation) {
  torch::manual_seed(0);
  Net net;
  for (auto& p : net.parameters()) p.detach().normal_();
  EMAModel ema(net);
  ema.step(net);  // decay 0: a copy
  {
    torch::NoGradGuard no_grad;
    for (auto& p : net.parameters()) p.add_(1.0);
  }
  ema.step(net);  // decay 2/11: the shadow now lags the (trainable) parameters
  std::vector<torch::Tensor> trained;
  for (const auto& p : net.parameters()) trained.push_back(p.detach().clone());

  ema.store(net);
  ema.copy_to(net);
  for (const auto& item : net.named_parameters()) {
    EXPECT_TRUE(torch::equal(item.value(), shadow_of(ema, item.key()))) << item.key();
  }
  EXPECT_FALSE(torch::equal(net.named_parameters()["conv.bias"], trained[2]));
  ema.restore(net);
  auto restored = net.parameters();
  for (std::size_t i = 0; i < trained.size(); ++i)
    EXPECT_TRUE(torch::equal(restored[i], trained[i]));
  EXPECT_THROW(ema.restore(net), std::logic_error);  // the stored copy is freed, as in diffusers
}

TEST(EMA, ShadowIsFloat32OnItsOwnDevice) {
  Net net;
  net.to(torch::kFloat64);
  EMAModel ema(net);
  for (const auto& [name, shadow] : ema.shadow()) {
    EXPECT_EQ(shadow.scalar_type(), torch::kFloat32) << name;
    EXPECT_TRUE(shadow.device().is_cpu());
  }
  EXPECT_THROW(ema.step(Conv{}), std::invalid_argument);  // a different module
}

TEST(EMA, LoadRejectsAMismatchedFileNamingTheTensor) {
  Net net;
  EMAModel ema(net);
  auto dir = sdtrain::testing::scratch_dir();
  auto expect_error = [&](const io::NamedTensors& tensors,
                          const std::map<std::string, std::string>& metadata,
                          const std::string& needle) {
    auto path = dir / "bad.safetensors";
    io::save_safetensors(path, tensors, metadata);
    try {
      ema.load(path);
      ADD_FAILURE() << "loaded: " << needle;
    } catch (const ModelError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
      EXPECT_NE(std::string(e.what()).find("bad.safetensors"), std::string::npos) << e.what();
    }
  };
  io::NamedTensors good = ema.shadow();
  std::map<std::string, std::string> step = {{"ema_optimization_step", "3"}};
  expect_error(good, {}, "ema_optimization_step");
  expect_error(good, {{"ema_optimization_step", "three"}}, "three");
  io::NamedTensors renamed = good;
  renamed[1].first = "conv.weights";
  expect_error(renamed, step, "\"conv.weight\"");
  io::NamedTensors reshaped = good;
  reshaped[2].second = torch::zeros({6});
  expect_error(reshaped, step, reshaped[2].first);
  io::NamedTensors fewer(good.begin(), good.begin() + 2);
  expect_error(fewer, step, "2 tensors");
  EXPECT_EQ(ema.optimization_step(), 0);  // a failed load changes nothing
}

// offload_ema false: the shadow on the GPU steps to the bits of the CPU shadow (the same float32
// operations, each rounded once either way), and its step reads nothing back to the host: under
// CUDA's sync debug mode "error" a synchronisation would throw.
TEST(EMAOnCuda, TheShadowOnTheGpuStepsAsOnTheCpuWithoutSynchronising) {
#if !SDTRAIN_WITH_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  torch::manual_seed(3);
  Net net;
  net.to(torch::kCUDA);
  EMAModel on_cpu(net, warmup_options(), torch::kCPU);
  EMAModel on_gpu(net, warmup_options(), torch::Device(torch::kCUDA));
  for (int step = 0; step < kSteps; ++step) {
    {
      torch::NoGradGuard no_grad;
      for (auto& parameter : net.parameters()) parameter.add_(torch::randn_like(parameter));
    }
    on_cpu.step(net);
    const sdtrain::testing::SyncDebugError error_on_sync;
    on_gpu.step(net);
  }
  for (const char* name : kNames) {
    EXPECT_TRUE(shadow_of(on_gpu, name).is_cuda()) << name;
    EXPECT_TRUE(torch::equal(shadow_of(on_gpu, name).cpu(), shadow_of(on_cpu, name))) << name;
  }
#endif
}
