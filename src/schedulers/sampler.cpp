#include "sdtrain/schedulers/sampler.h"

#include <algorithm>
#include <cctype>

#include "sdtrain/schedulers/ddim_scheduler.h"
#include "sdtrain/schedulers/dpm_solver_multistep_scheduler.h"
#include "sdtrain/schedulers/euler_ancestral_discrete_scheduler.h"
#include "sdtrain/schedulers/euler_discrete_scheduler.h"
#include "sdtrain/schedulers/pndm_scheduler.h"
#include "sdtrain/util/error.h"

namespace sdtrain::schedulers {

Sampler::Sampler(const SchedulerConfig& config) : schedule_(config) {}

torch::Tensor Sampler::scale_model_input(const torch::Tensor& sample, int64_t) { return sample; }

void Sampler::check_step_count(int64_t num_inference_steps) {
  const int64_t limit = config().num_train_timesteps;
  if (num_inference_steps < 1 || num_inference_steps > limit) {
    throw ConfigError("sampling steps must be between 1 and the model's num_train_timesteps (" +
                      std::to_string(limit) + "), got " + std::to_string(num_inference_steps));
  }
  num_inference_steps_ = num_inference_steps;
  next_step_ = 0;
}

void Sampler::expect_step(int64_t step_index) {
  if (step_index != next_step_ || step_index < 0 || step_index >= num_steps()) {
    throw std::logic_error(name() + " sampler: step " + std::to_string(step_index) + " called, expected step " +
                           std::to_string(next_step_) + " of " + std::to_string(num_steps()) +
                           " (call set_timesteps first; steps run in order)");
  }
  ++next_step_;
}

torch::Tensor randn_tensor(at::IntArrayRef shape, const std::vector<at::Generator>& generators,
                           c10::ScalarType dtype, torch::Device device) {
  const auto options = torch::TensorOptions().dtype(dtype);
  if (generators.empty()) return torch::randn(shape, options.device(device));
  if (generators.size() == 1) {
    const at::Generator& generator = generators.front();
    return torch::randn(shape, generator, options.device(generator.device())).to(device);
  }
  TORCH_CHECK(static_cast<int64_t>(generators.size()) == shape[0], "randn_tensor: ", generators.size(),
              " generators for a batch of ", shape[0]);
  std::vector<int64_t> one(shape.begin(), shape.end());
  one[0] = 1;
  std::vector<torch::Tensor> parts;
  for (const auto& generator : generators) {
    parts.push_back(torch::randn(one, generator, options.device(generator.device())));
  }
  return torch::cat(parts, 0).to(device);
}

namespace {

std::string lower(std::string text) {
  std::transform(text.begin(), text.end(), text.begin(), [](unsigned char c) { return std::tolower(c); });
  return text;
}

std::string valid_names() {
  std::string names = "default";
  for (const auto& name : sampler_names()) names += ", " + name;
  return names + " (or a diffusers class name: DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, "
                 "EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler)";
}

// A sampler by short or class name; nullptr when the name is neither.
std::unique_ptr<Sampler> by_name(const std::string& name, const SchedulerConfig& config) {
  const std::string key = lower(name);
  if (key == "ddim" || key == "ddimscheduler") return std::make_unique<DDIMScheduler>(config);
  if (key == "pndm" || key == "plms") return std::make_unique<PNDMScheduler>(config, /*force_skip_prk_steps=*/true);
  if (key == "pndmscheduler") return std::make_unique<PNDMScheduler>(config);
  if (key == "euler" || key == "eulerdiscretescheduler") return std::make_unique<EulerDiscreteScheduler>(config);
  // euler_ancestral, dpmsolver++ and dpmsolver++_karras: the spellings of the training
  // configuration's prior_generation_scheduler.
  if (key == "euler_a" || key == "euler_ancestral" || key == "eulerancestraldiscretescheduler") {
    return std::make_unique<EulerAncestralDiscreteScheduler>(config);
  }
  if (key == "dpm++2m" || key == "dpmsolver++") return std::make_unique<DPMSolverMultistepScheduler>(config, false);
  if (key == "dpm++2m_karras" || key == "dpmsolver++_karras") return std::make_unique<DPMSolverMultistepScheduler>(config, true);
  if (key == "dpmsolvermultistepscheduler") return std::make_unique<DPMSolverMultistepScheduler>(config);
  return nullptr;
}

}  // namespace

const std::vector<std::string>& sampler_names() {
  static const std::vector<std::string> names = {"ddim", "pndm", "euler", "euler_a", "dpm++2m", "dpm++2m_karras"};
  return names;
}

std::unique_ptr<Sampler> make_sampler(const std::string& name, const SchedulerConfig& model_config) {
  if (name.empty() || lower(name) == "default") {
    if (model_config.class_name.empty()) {
      throw ModelError("scheduler_config.json has no \"_class_name\": name a sampler with --scheduler (" +
                       valid_names() + ")");
    }
    auto sampler = by_name(model_config.class_name, model_config);
    if (!sampler) {
      throw ModelError("scheduler_config.json: the model's scheduler class \"" + model_config.class_name +
                       "\" is not implemented; choose one with --scheduler (" + valid_names() + ")");
    }
    return sampler;
  }
  auto sampler = by_name(name, model_config);
  if (!sampler) throw ConfigError("unknown scheduler \"" + name + "\"; valid names: " + valid_names());
  return sampler;
}

}  // namespace sdtrain::schedulers
