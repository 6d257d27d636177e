#pragma once
// scheduler/scheduler_config.json: the noise schedule every diffusers scheduler class shares
// (betas, prediction type) plus the sampling keys each class reads. Parsed once; samplers read
// their class-specific keys from the same struct.

#include <filesystem>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

namespace sdtrain::schedulers {

enum class PredictionType { epsilon, v_prediction };

struct SchedulerConfig {
  std::string class_name;  // "PNDMScheduler", "DDIMScheduler", ... ("" when absent)
  int64_t num_train_timesteps = 1000;
  double beta_start = 0.0001;
  double beta_end = 0.02;
  std::string beta_schedule = "linear";  // linear, scaled_linear, squaredcos_cap_v2
  std::vector<double> trained_betas;     // overrides beta_schedule when non-empty
  PredictionType prediction_type = PredictionType::epsilon;
  // Sampling keys, std::nullopt when the file lacks them. Each sampler class then applies its
  // own default, as diffusers' from_config does when switching class: keys the file sets are
  // carried over, absent ones take the new class's default (leading for DDIM/PNDM, linspace for
  // Euler/DPM-Solver; set_alpha_to_one true for DDIM, false for PNDM; clip_sample true for DDIM).
  std::optional<std::string> timestep_spacing;  // leading, linspace or trailing
  int64_t steps_offset = 0;                     // 0 in every class
  std::optional<bool> set_alpha_to_one;
  std::optional<bool> clip_sample;
  double clip_sample_range = 1.0;
  std::optional<bool> skip_prk_steps;
  std::optional<bool> use_karras_sigmas;
  // The whole file, for keys only one sampler class reads.
  nlohmann::json json = nlohmann::json::object();

  // Throws ModelError naming the file and key for values this implementation does not
  // reproduce (thresholding, rescale_betas_zero_snr, other prediction types or beta schedules).
  static SchedulerConfig from_json(const nlohmann::json& json, const std::string& source = "scheduler_config.json");
  static SchedulerConfig from_file(const std::filesystem::path& path);
};

const char* to_string(PredictionType type);

}  // namespace sdtrain::schedulers
