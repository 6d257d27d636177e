// Every sampler against its diffusers class (tools/make_scheduler_fixtures.py): the same
// timesteps, sigmas and initial noise scale for 1, 10, 25 and 50 steps, and, fed the same
// sequence of model outputs, the same sample after every step.
//
// Tolerances (docs/parity.md has the measured spread per CPU capability). Integer timesteps:
// exact (integer index math). Sigmas: the same float32 ATen operations (sqrt, pow, log, exp,
// interpolation) run on both sides, but their last bit depends on the vector unit ATen
// dispatches to (scalar, AVX2, AVX-512): the reference itself moves by up to 3 ulp between
// capabilities, so sigmas must agree to kSigmaUlps elementwise, which still catches any wrong
// formula (that moves sigmas by millions of ulp). Trajectories: the same operations in the same
// order; what differs per capability is the sigma ulps above and, for the ancestral sampler,
// the last bits of torch's own normal draws, so samples may move by a small fraction of
// max|ref|, while a wrong coefficient, an off-by-one in the history or a missing clip moves
// them by more than 1e-3. How far kSigmaUlps of sigma movement can carry a trajectory depends
// on the schedule: tools/sigma_ulp_sensitivity.py replays each fixture with diffusers and its
// sigmas moved by up to 3 ulp, and the tolerance per config below is that measured spread,
// rounded up (never below 1e-6). The cosine schedule with linspace spacing starts where
// alphas_cumprod is almost 0, so its first sigma amplifies an ulp about a thousandfold.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "scheduler_support.h"
#include "sdtrain/schedulers/sampler.h"

using namespace sdtrain;
using namespace sdtrain::schedulers;
using sdtrain::testing::cpu_capability;
using sdtrain::testing::max_ulp_distance;
using sdtrain::testing::relative_difference;

namespace {

constexpr int64_t kSigmaUlps = 3;  // measured: 0 (AVX2), up to 3 (DEFAULT), about 1 (AVX-512)

double trajectory_tolerance(const std::string& config) {
  static const std::map<std::string, double> measured = {
      {"sd21_base", 2.0e-6}, {"demo", 1.3e-6},     {"trailing", 1.0e-6},        {"sd21_v", 1.1e-5},
      {"ddim_defaults", 7.5e-6}, {"euler_karras", 1.7e-6}, {"cosine_linspace", 4.6e-4}};
  return measured.at(config);
}

constexpr double kSigmaTolerance = kSigmaUlps * 1.2e-7;  // the same, relative, for scalars

const std::vector<std::string> kConfigs = {"sd21_base", "demo", "trailing", "sd21_v",
                                           "ddim_defaults", "cosine_linspace", "euler_karras"};

const std::map<std::string, torch::Tensor>& fixtures() {
  static const auto tensors = sdtrain::testing::read_scheduler_fixture("samplers.safetensors");
  return tensors;
}

const torch::Tensor* find(const std::string& key) {
  auto it = fixtures().find(key);
  return it == fixtures().end() ? nullptr : &it->second;
}

class SamplerParity : public ::testing::TestWithParam<std::string> {};

TEST_P(SamplerParity, TimestepsSigmasAndInitialNoiseMatchDiffusers) {
  const auto config = sdtrain::testing::scheduler_fixture_config(GetParam());
  int compared = 0;
  int64_t worst_sigma_ulps = 0;
  for (const auto& name : sampler_names()) {
    for (int64_t steps : {1, 10, 25, 50}) {
      const std::string prefix = GetParam() + "/" + name + "/n" + std::to_string(steps);
      const torch::Tensor* timesteps = find(prefix + ".timesteps");
      ASSERT_NE(timesteps, nullptr) << prefix << ": " << sdtrain::testing::kRegenerateSchedulerFixtures;
      auto sampler = make_sampler(name, config);
      sampler->set_timesteps(steps);
      ASSERT_EQ(sampler->timesteps().scalar_type(), timesteps->scalar_type()) << prefix;
      ASSERT_EQ(sampler->timesteps().sizes(), timesteps->sizes()) << prefix << "\nours " << sampler->timesteps()
                                                                  << "\nref " << *timesteps;
      const bool karras = name == "dpm++2m_karras" || (name == "euler" && config.use_karras_sigmas.value_or(false));
      if (karras && timesteps->is_floating_point()) {
        EXPECT_LE(relative_difference(sampler->timesteps(), *timesteps), 1e-6) << prefix;
      } else {
        EXPECT_TRUE(torch::equal(sampler->timesteps(), *timesteps))
            << prefix << "\nours " << sampler->timesteps() << "\nref " << *timesteps;
      }
      if (const torch::Tensor* sigmas = find(prefix + ".sigmas")) {
        ASSERT_TRUE(sampler->sigmas().defined()) << prefix;
        const int64_t ulps = max_ulp_distance(sampler->sigmas(), *sigmas);
        EXPECT_LE(ulps, kSigmaUlps) << prefix << " sigmas differ by " << ulps << " ulp";
        worst_sigma_ulps = std::max(worst_sigma_ulps, ulps);
      }
      const double init = find(prefix + ".init_noise_sigma")->item<double>();
      EXPECT_NEAR(sampler->init_noise_sigma(), init, init * kSigmaTolerance) << prefix;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 24);
  std::cout << "[ measured ] " << GetParam() << " sigmas: " << worst_sigma_ulps << " ulp (" << cpu_capability() << ")\n";
}

TEST_P(SamplerParity, StepByStepSamplesMatchDiffusers) {
  const auto config = sdtrain::testing::scheduler_fixture_config(GetParam());
  int compared = 0;
  for (const auto& name : sampler_names()) {
    for (int64_t steps : {10, 25}) {
      const std::string prefix = GetParam() + "/" + name + "/traj" + std::to_string(steps);
      const torch::Tensor* sample0 = find(prefix + ".sample0");
      if (!sample0) continue;  // not recorded for this config (see the fixture script)
      const torch::Tensor outputs = *find(prefix + ".model_outputs");
      const torch::Tensor scaled = *find(prefix + ".scaled_inputs");
      const torch::Tensor samples = *find(prefix + ".samples");
      auto sampler = make_sampler(name, config);
      sampler->set_timesteps(steps);
      ASSERT_EQ(sampler->num_steps(), outputs.size(0)) << prefix;
      at::Generator noise = at::detail::createCPUGenerator(7);  // NOISE_SEED of the script
      torch::Tensor sample = sample0->clone();
      double worst = 0;
      const double kTrajectoryTolerance = trajectory_tolerance(GetParam());
      for (int64_t i = 0; i < sampler->num_steps(); ++i) {
        const double ds = relative_difference(sampler->scale_model_input(sample, i), scaled[i]);
        EXPECT_LE(ds, kTrajectoryTolerance) << prefix << " scaled input of step " << i;
        sample = sampler->step(outputs[i], i, sample, {noise});
        const double d = relative_difference(sample, samples[i]);
        ASSERT_LE(d, kTrajectoryTolerance) << prefix << " sample after step " << i;
        worst = std::max(worst, d);
      }
      std::cout << "[ measured ] " << prefix << ": " << worst << " relative (worst step, " << cpu_capability() << ")\n";
      ++compared;
    }
  }
  EXPECT_GE(compared, 5);
}

INSTANTIATE_TEST_SUITE_P(Configs, SamplerParity, ::testing::ValuesIn(kConfigs),
                         [](const auto& info) { return info.param; });

TEST(SamplerParity, CpuGeneratorDrawsLikeTorchGenerator) {
  // randn_tensor with one CPU generator must be torch.randn(shape,
  // generator=torch.Generator().manual_seed(seed)), bit for bit. torch's CPU normal draws of 16
  // or more values take a vectorised path whose last bits depend on the CPU capability (scalar
  // vs AVX2/AVX-512), so the reference is torch itself on this machine, under the same
  // ATEN_CPU_CAPABILITY: the reference environment when present, else the fixture recorded
  // under AVX2, which holds for the AVX2 and AVX-512 kernels (measured, docs/parity.md).
  at::Generator generator = at::detail::createCPUGenerator(10);
  const torch::Tensor drawn = randn_tensor({2, 4, 2, 4}, {generator}, torch::kFloat32, torch::kCPU);
  const std::string python = sdtrain::testing::reference_python();
  if (!python.empty()) {
    const auto file = sdtrain::testing::scratch_dir() / "randn.safetensors";
    std::string output;
    const int code = sdtrain::testing::run_command(
        python + " -c 'import sys, torch; from safetensors.torch import save_file; save_file({\"x\": torch.randn("
                 "(2, 4, 2, 4), generator=torch.Generator().manual_seed(10))}, sys.argv[1])' " + file.string(),
        &output);
    ASSERT_EQ(code, 0) << output;
    EXPECT_TRUE(torch::equal(drawn, io::SafetensorsFile(file).tensor("x"))) << cpu_capability();
    return;
  }
  if (cpu_capability() == "DEFAULT") {
    GTEST_SKIP() << "no reference environment, and the fixture's normal draws were recorded with ATen's "
                    "vectorised kernels (AVX2), which the DEFAULT (scalar) capability does not reproduce bit for bit";
  }
  EXPECT_TRUE(torch::equal(drawn, *find("sd21_base/ddim/traj10.sample0"))) << cpu_capability();
}

}  // namespace
