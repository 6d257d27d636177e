#include "sdtrain/schedulers/scheduler_config.h"

#include "../models/config_reader.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"

namespace sdtrain::schedulers {

namespace {

PredictionType parse_prediction_type(models::detail::ConfigReader& reader) {
  const std::string value = reader.string("prediction_type", "epsilon");
  if (value == "epsilon") return PredictionType::epsilon;
  if (value == "v_prediction") return PredictionType::v_prediction;
  reader.fail("prediction_type", value, "expected \"epsilon\" or \"v_prediction\"");
}

std::vector<double> parse_trained_betas(models::detail::ConfigReader& reader, int64_t num_train_timesteps) {
  const nlohmann::json* value = reader.find("trained_betas");
  if (!value || value->is_null()) return {};
  if (!value->is_array() || static_cast<int64_t>(value->size()) != num_train_timesteps) {
    reader.fail("trained_betas", *value, "expected a list of num_train_timesteps numbers");
  }
  std::vector<double> betas;
  for (const auto& beta : *value) {
    if (!beta.is_number()) reader.fail("trained_betas", *value, "expected numbers");
    betas.push_back(beta.get<double>());
  }
  return betas;
}

}  // namespace

SchedulerConfig SchedulerConfig::from_json(const nlohmann::json& json, const std::string& source) {
  models::detail::ConfigReader reader(json, source);
  SchedulerConfig config;
  config.json = json;
  config.class_name = reader.string("_class_name", "");
  config.num_train_timesteps = reader.integer("num_train_timesteps", 1000);
  if (config.num_train_timesteps < 2) {
    reader.fail("num_train_timesteps", config.num_train_timesteps, "expected at least 2");
  }
  config.beta_start = reader.number("beta_start", 0.0001);
  config.beta_end = reader.number("beta_end", 0.02);
  config.beta_schedule = reader.string("beta_schedule", "linear");
  if (config.beta_schedule != "linear" && config.beta_schedule != "scaled_linear" &&
      config.beta_schedule != "squaredcos_cap_v2") {
    reader.fail("beta_schedule", config.beta_schedule, "expected linear, scaled_linear or squaredcos_cap_v2");
  }
  config.trained_betas = parse_trained_betas(reader, config.num_train_timesteps);
  config.prediction_type = parse_prediction_type(reader);
  config.timestep_spacing = reader.string("timestep_spacing", "");
  if (!config.timestep_spacing.empty() && config.timestep_spacing != "leading" &&
      config.timestep_spacing != "linspace" && config.timestep_spacing != "trailing") {
    reader.fail("timestep_spacing", config.timestep_spacing, "expected leading, linspace or trailing");
  }
  config.steps_offset = reader.integer("steps_offset", 0);
  // diffusers' class defaults: PNDM starts from alpha = 1 only when asked, DDIM by default.
  config.set_alpha_to_one = reader.boolean("set_alpha_to_one", config.class_name != "PNDMScheduler");
  config.clip_sample = reader.boolean("clip_sample", config.class_name == "DDIMScheduler" ||
                                                         config.class_name == "DDPMScheduler");
  config.clip_sample_range = reader.number("clip_sample_range", 1.0);
  config.skip_prk_steps = reader.boolean("skip_prk_steps", false);
  config.use_karras_sigmas = reader.boolean("use_karras_sigmas", false, /*null_is_false=*/true);
  reader.require_value("thresholding", false, "dynamic thresholding is for pixel-space models");
  reader.require_value("rescale_betas_zero_snr", false, "zero-terminal-SNR rescaling is not implemented");
  return config;
}

SchedulerConfig SchedulerConfig::from_file(const std::filesystem::path& path) {
  return from_json(read_json_file(path, ExitCode::model), path.string());
}

const char* to_string(PredictionType type) {
  return type == PredictionType::epsilon ? "epsilon" : "v_prediction";
}

}  // namespace sdtrain::schedulers
