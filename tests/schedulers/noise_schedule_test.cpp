// The training noise schedule against diffusers' DDPMScheduler and compute_snr
// (tools/make_scheduler_fixtures.py): betas and alphas_cumprod for every beta schedule, and
// add_noise, the velocity target and the SNR for fixed inputs.
//
// Tolerance: betas/alphas_cumprod for linear and scaled_linear: the same float32 torch ops
// (linspace, pow, cumprod), whose vectorised kernels round the last bit differently per CPU
// capability: the reference itself moves by up to 3 ulp (betas) and 2 ulp (alphas_cumprod)
// between DEFAULT and AVX2 (docs/parity.md), so 3 ulp elementwise. The cosine schedule and
// trained betas are computed in float64 and cast: exact on every capability (measured).
// add_noise/velocity/snr: 1e-6 relative (float32 products; measured 0 on AVX2, <4e-7 on DEFAULT).

#include <gtest/gtest.h>

#include "scheduler_support.h"
#include "sdtrain/schedulers/noise_schedule.h"
#include "sdtrain/util/json.h"

using namespace sdtrain;
using namespace sdtrain::schedulers;
using sdtrain::testing::max_ulp_distance;
using sdtrain::testing::relative_difference;

namespace {

class NoiseScheduleParity : public ::testing::TestWithParam<std::string> {};

TEST_P(NoiseScheduleParity, MatchesDDPMScheduler) {
  static const auto tensors = sdtrain::testing::read_scheduler_fixture("noise_schedule.safetensors");
  static const auto configs =
      read_json_file(sdtrain::testing::fixture("schedulers/noise_schedules.json"), ExitCode::input_data);
  const std::string key = GetParam();
  ASSERT_TRUE(configs.contains(key)) << sdtrain::testing::kRegenerateSchedulerFixtures;
  NoiseSchedule schedule(SchedulerConfig::from_json(configs.at(key), key));
  const bool float64_formula = key == "squaredcos_cap_v2" || key == "trained";
  const int64_t allowed_ulps = float64_formula ? 0 : 3;
  const int64_t beta_ulps = max_ulp_distance(schedule.betas(), tensors.at(key + ".betas"));
  const int64_t alpha_ulps = max_ulp_distance(schedule.alphas_cumprod(), tensors.at(key + ".alphas_cumprod"));
  EXPECT_LE(beta_ulps, allowed_ulps) << key << " betas";
  EXPECT_LE(alpha_ulps, allowed_ulps) << key << " alphas_cumprod";
  std::cout << "[ measured ] " << key << ": betas " << beta_ulps << " ulp, alphas_cumprod " << alpha_ulps << " ulp ("
            << sdtrain::testing::cpu_capability() << ")\n";
  const auto& x0 = tensors.at("x0");
  const auto& noise = tensors.at("noise");
  const auto& t = tensors.at("timesteps");
  EXPECT_LE(relative_difference(schedule.add_noise(x0, noise, t), tensors.at(key + ".add_noise")), 1e-6) << key;
  EXPECT_LE(relative_difference(schedule.velocity(x0, noise, t), tensors.at(key + ".velocity")), 1e-6) << key;
  EXPECT_LE(relative_difference(schedule.snr(t), tensors.at(key + ".snr")), 1e-6) << key;
  const torch::Tensor target = schedule.training_target(x0, noise, t);
  EXPECT_TRUE(torch::equal(target, key.ends_with("_v") ? schedule.velocity(x0, noise, t) : noise)) << key;
}

INSTANTIATE_TEST_SUITE_P(BetaSchedules, NoiseScheduleParity,
                         ::testing::Values("linear", "scaled_linear", "scaled_linear_v", "squaredcos_cap_v2",
                                           "trained"));

TEST(NoiseSchedule, StableDiffusionReferenceValues) {
  // SD 2.1-base's published schedule: alphas_cumprod[0] = 0.99915, [999] = 0.0046601.
  NoiseSchedule schedule(sdtrain::testing::scheduler_fixture_config("sd21_base"));
  EXPECT_NEAR(schedule.alphas_cumprod()[0].item<double>(), 0.99915, 1e-6);
  EXPECT_NEAR(schedule.alphas_cumprod()[999].item<double>(), 0.0046601, 1e-7);
}

}  // namespace
