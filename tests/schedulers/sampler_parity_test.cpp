// Every sampler against its diffusers class (tools/make_scheduler_fixtures.py): the same
// timesteps, sigmas and initial noise scale for 1, 10, 25 and 50 steps, and, fed the same
// sequence of model outputs, the same sample after every step.
//
// Tolerances. Timesteps: exact (integers, or float32 values computed by the same float64
// formulas and cast). Sigmas and init_noise_sigma: exact in float32 except where a value goes
// through log/pow in float64 (Karras sigmas, sigma_to_t), where 1 ulp of float32 (1.2e-7
// relative) is allowed. Trajectories: each step runs the same ATen operations in the same order
// on 0-dim float32 coefficients, so the measured difference is 0; the check allows 1e-6 of
// max|ref| (fp32 round-off over a few dozen operations) so that a different but equally valid
// evaluation order would still pass, while any real mistake (a wrong coefficient, an off-by-one
// in the history, a missing clip) moves samples by far more than 1e-3.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "scheduler_support.h"
#include "sdtrain/schedulers/sampler.h"

using namespace sdtrain;
using namespace sdtrain::schedulers;
using sdtrain::testing::relative_difference;

namespace {

constexpr double kTrajectoryTolerance = 1e-6;
constexpr double kSigmaTolerance = 2.4e-7;  // 2 ulp of float32, relative

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
        const double d = relative_difference(sampler->sigmas(), *sigmas);
        if (karras) {
          EXPECT_LE(d, kSigmaTolerance) << prefix;
        } else {
          EXPECT_TRUE(torch::equal(sampler->sigmas(), *sigmas)) << prefix << " sigmas differ by " << d;
        }
      }
      const double init = find(prefix + ".init_noise_sigma")->item<double>();
      EXPECT_NEAR(sampler->init_noise_sigma(), init, init * kSigmaTolerance) << prefix;
      ++compared;
    }
  }
  EXPECT_EQ(compared, 24);
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
      for (int64_t i = 0; i < sampler->num_steps(); ++i) {
        const double ds = relative_difference(sampler->scale_model_input(sample, i), scaled[i]);
        EXPECT_LE(ds, kTrajectoryTolerance) << prefix << " scaled input of step " << i;
        sample = sampler->step(outputs[i], i, sample, {noise});
        const double d = relative_difference(sample, samples[i]);
        ASSERT_LE(d, kTrajectoryTolerance) << prefix << " sample after step " << i;
        worst = std::max(worst, d);
      }
      std::cout << "[ measured ] " << prefix << ": " << worst << " relative (worst step)\n";
      ++compared;
    }
  }
  EXPECT_GE(compared, 5);
}

INSTANTIATE_TEST_SUITE_P(Configs, SamplerParity, ::testing::ValuesIn(kConfigs),
                         [](const auto& info) { return info.param; });

TEST(SamplerParity, CpuGeneratorDrawsLikeTorchGenerator) {
  // The same seed and shape as the trajectory's first draw in a fixture: randn_tensor with one
  // CPU generator must be torch.randn(shape, generator=torch.Generator().manual_seed(seed)).
  const auto config = sdtrain::testing::scheduler_fixture_config("sd21_base");
  auto sampler = make_sampler("ddim", config);
  sampler->set_timesteps(10);
  at::Generator generator = at::detail::createCPUGenerator(10);  // seed 1000 * 0 + 10
  torch::Tensor drawn = randn_tensor({2, 4, 2, 4}, {generator}, torch::kFloat32, torch::kCPU);
  EXPECT_TRUE(torch::equal(drawn, *find("sd21_base/ddim/traj10.sample0")));
}

}  // namespace
