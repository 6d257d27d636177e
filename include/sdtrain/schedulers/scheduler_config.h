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
  // Sampling keys. timestep_spacing is empty when the file lacks it: each sampler class then
  // applies its own default (leading for DDIM/PNDM/DDPM, linspace for Euler/DPM-Solver).
  std::string timestep_spacing;
  int64_t steps_offset = 0;
  bool set_alpha_to_one = true;
  bool clip_sample = true;
  double clip_sample_range = 1.0;
  bool skip_prk_steps = false;
  bool use_karras_sigmas = false;
  // The whole file, for keys only one sampler class reads.
  nlohmann::json json = nlohmann::json::object();

  // Throws ModelError naming the file and key for values this implementation does not
  // reproduce (thresholding, rescale_betas_zero_snr, other prediction types or beta schedules).
  static SchedulerConfig from_json(const nlohmann::json& json, const std::string& source = "scheduler_config.json");
  static SchedulerConfig from_file(const std::filesystem::path& path);
};

const char* to_string(PredictionType type);

}  // namespace sdtrain::schedulers
