// scheduler_config.json parsing and make_sampler's choice of class and defaults.

#include <gtest/gtest.h>

#include "scheduler_support.h"
#include "sdtrain/schedulers/sampler.h"
#include "sdtrain/util/error.h"

using namespace sdtrain;
using namespace sdtrain::schedulers;

namespace {

TEST(SchedulerConfig, AbsentSamplingKeysStayUnset) {
  const auto config = sdtrain::testing::scheduler_fixture_config("sd21_base");
  EXPECT_EQ(config.class_name, "PNDMScheduler");
  EXPECT_FALSE(config.timestep_spacing.has_value());
  EXPECT_EQ(config.steps_offset, 1);
  EXPECT_EQ(config.set_alpha_to_one, false);
  EXPECT_EQ(config.skip_prk_steps, true);
  EXPECT_FALSE(config.use_karras_sigmas.has_value());
  const auto bare = sdtrain::testing::scheduler_fixture_config("ddim_defaults");
  EXPECT_FALSE(bare.set_alpha_to_one.has_value());
  EXPECT_FALSE(bare.clip_sample.has_value());
  EXPECT_EQ(bare.beta_schedule, "linear");
}

TEST(SchedulerConfig, ReadsWhatDiffusersSavesIncludingInfinity) {
  // DPMSolverMultistepScheduler.save_config writes "lambda_min_clipped": -Infinity.
  const auto config = SchedulerConfig::from_file(sdtrain::testing::fixture("schedulers/dpm_saved/scheduler_config.json"));
  EXPECT_EQ(config.class_name, "DPMSolverMultistepScheduler");
  EXPECT_EQ(config.use_karras_sigmas, true);
  auto sampler = make_sampler("default", config);
  EXPECT_EQ(sampler->name(), "dpm++2m_karras");
}

TEST(SchedulerConfig, RejectsWhatIsNotImplemented) {
  auto json = nlohmann::json::parse(R"({"_class_name": "DDIMScheduler", "prediction_type": "sample"})");
  sdtrain::testing::expect_model_error([&] { SchedulerConfig::from_json(json, "x.json"); }, {"x.json", "prediction_type"});
  json = nlohmann::json::parse(R"({"_class_name": "DDIMScheduler", "timestep_spacing": "sometimes"})");
  sdtrain::testing::expect_model_error([&] { SchedulerConfig::from_json(json, "x.json"); }, {"timestep_spacing"});
  json = nlohmann::json::parse(R"({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3})");
  sdtrain::testing::expect_model_error([&] { make_sampler("default", SchedulerConfig::from_json(json)); },
                                       {"solver_order"});
}

TEST(MakeSampler, NamesAndClassNames) {
  const auto config = sdtrain::testing::scheduler_fixture_config("sd21_base");
  EXPECT_EQ(make_sampler("", config)->name(), "pndm");
  EXPECT_EQ(make_sampler("default", config)->class_name(), "PNDMScheduler");
  const std::map<std::string, std::string> names = {
      {"ddim", "ddim"}, {"DDIMScheduler", "ddim"}, {"pndm", "pndm"}, {"euler", "euler"},
      {"EulerDiscreteScheduler", "euler"}, {"euler_a", "euler_a"}, {"EulerAncestralDiscreteScheduler", "euler_a"},
      {"dpm++2m", "dpm++2m"}, {"dpm++2m_karras", "dpm++2m_karras"}, {"DPMSolverMultistepScheduler", "dpm++2m"},
      // The training configuration's spellings.
      {"euler_ancestral", "euler_a"}, {"dpmsolver++", "dpm++2m"}, {"dpmsolver++_karras", "dpm++2m_karras"}};
  for (const auto& [name, expected] : names) EXPECT_EQ(make_sampler(name, config)->name(), expected) << name;
}

TEST(MakeSampler, UnknownNameIsAConfigErrorListingTheNames) {
  const auto config = sdtrain::testing::scheduler_fixture_config("sd21_base");
  try {
    make_sampler("lms", config);
    FAIL() << "expected a ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_EQ(e.code(), ExitCode::usage);
    const std::string message = e.what();
    for (const auto& name : sampler_names()) EXPECT_NE(message.find(name), std::string::npos) << message;
  }
}

TEST(MakeSampler, UnimplementedModelClassIsAModelError) {
  auto json = nlohmann::json::parse(R"({"_class_name": "LMSDiscreteScheduler"})");
  sdtrain::testing::expect_model_error([&] { make_sampler("default", SchedulerConfig::from_json(json)); },
                                       {"LMSDiscreteScheduler", "--scheduler"});
  EXPECT_EQ(make_sampler("euler", SchedulerConfig::from_json(json))->name(), "euler");
}

TEST(MakeSampler, StepCountsOutsideTheScheduleAreConfigErrors) {
  auto sampler = make_sampler("ddim", sdtrain::testing::scheduler_fixture_config("sd21_base"));
  EXPECT_THROW(sampler->set_timesteps(0), ConfigError);
  EXPECT_THROW(sampler->set_timesteps(1001), ConfigError);
}

TEST(MakeSampler, ClassDefaultsApplyOnlyToAbsentKeys) {
  // sd21_base lacks timestep_spacing: DDIM/PNDM place "leading" timesteps (+ steps_offset 1),
  // Euler and DPM-Solver "linspace" ones; demo.json spells out "leading", which every class keeps.
  const auto hub = sdtrain::testing::scheduler_fixture_config("sd21_base");
  const auto saved = sdtrain::testing::scheduler_fixture_config("demo");
  auto first = [](const std::string& name, const SchedulerConfig& config) {
    auto sampler = make_sampler(name, config);
    sampler->set_timesteps(50);
    return sampler->timesteps()[0].item<double>();
  };
  EXPECT_EQ(first("ddim", hub), 981);
  EXPECT_EQ(first("euler", hub), 999);
  EXPECT_EQ(first("dpm++2m", hub), 999);
  EXPECT_EQ(first("euler", saved), 981);
  // Euler's initial noise scale follows the spacing: sqrt(sigma_max^2 + 1) for leading.
  auto euler = make_sampler("euler", saved);
  euler->set_timesteps(50);
  EXPECT_NEAR(euler->init_noise_sigma(), 13.1585, 1e-3);
}

TEST(MakeSampler, StepsMustRunInOrder) {
  auto sampler = make_sampler("dpm++2m", sdtrain::testing::scheduler_fixture_config("sd21_base"));
  sampler->set_timesteps(5);
  torch::Tensor x = torch::zeros({1, 4, 2, 2});
  EXPECT_THROW(sampler->step(x, 1, x), std::logic_error);
  EXPECT_NO_THROW(sampler->step(x, 0, x));
}

}  // namespace
