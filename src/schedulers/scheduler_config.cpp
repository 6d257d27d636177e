#include "sdtrain/schedulers/scheduler_config.h"

#include "../models/config_reader.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/json.h"
#include "sdtrain/util/text.h"

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

// A boolean key, or std::nullopt when absent or null (the sampler class's default applies).
std::optional<bool> optional_boolean(models::detail::ConfigReader& reader, const std::string& key) {
  const nlohmann::json* value = reader.find(key);
  if (!value || value->is_null()) return std::nullopt;
  return reader.boolean(key, false);
}

// Python's json module writes float("-inf") as the bare word -Infinity (DPMSolverMultistep's
// lambda_min_clipped default), which strict JSON parsers reject. Outside string literals,
// -Infinity, Infinity and NaN become null, which every reader here treats as "the default".
std::string without_non_finite_numbers(const std::string& text) {
  std::string out;
  bool in_string = false;
  for (std::size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      out += c;
      if (c == '\\' && i + 1 < text.size()) out += text[++i];
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    bool replaced = false;
    for (const std::string word : {"-Infinity", "Infinity", "NaN"}) {
      if (text.compare(i, word.size(), word) == 0) {
        out += "null";
        i += word.size() - 1;
        replaced = true;
        break;
      }
    }
    if (!replaced) out += c;
  }
  return out;
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
  if (const nlohmann::json* spacing = reader.find("timestep_spacing"); spacing && !spacing->is_null()) {
    config.timestep_spacing = reader.string("timestep_spacing", "");
    if (config.timestep_spacing != "leading" && config.timestep_spacing != "linspace" &&
        config.timestep_spacing != "trailing") {
      reader.fail("timestep_spacing", *config.timestep_spacing, "expected leading, linspace or trailing");
    }
  }
  config.steps_offset = reader.integer("steps_offset", 0);
  if (config.steps_offset < 0) reader.fail("steps_offset", config.steps_offset, "expected 0 or more");
  config.set_alpha_to_one = optional_boolean(reader, "set_alpha_to_one");
  config.clip_sample = optional_boolean(reader, "clip_sample");
  config.clip_sample_range = reader.number("clip_sample_range", 1.0);
  config.skip_prk_steps = optional_boolean(reader, "skip_prk_steps");
  config.use_karras_sigmas = optional_boolean(reader, "use_karras_sigmas");
  reader.require_value("thresholding", false, "dynamic thresholding is for pixel-space models");
  reader.require_value("rescale_betas_zero_snr", false, "zero-terminal-SNR rescaling is not implemented");
  return config;
}

SchedulerConfig SchedulerConfig::from_file(const std::filesystem::path& path) {
  if (!std::filesystem::exists(path)) throw ModelError(path.string() + ": file not found");
  const std::string text = without_non_finite_numbers(read_file(path, ExitCode::model));
  try {
    return from_json(nlohmann::json::parse(text), path.string());
  } catch (const nlohmann::json::parse_error& e) {
    throw ModelError(path.string() + ": not valid JSON at byte " + std::to_string(e.byte) + " (" + printable(e.what()) + ")");
  }
}

const char* to_string(PredictionType type) {
  return type == PredictionType::epsilon ? "epsilon" : "v_prediction";
}

}  // namespace sdtrain::schedulers
