#pragma once
// The samplers of `sdtrain generate`, class images and validation images: one class per
// diffusers scheduler class (ddim_scheduler.h, pndm_scheduler.h, euler_discrete_scheduler.h,
// euler_ancestral_discrete_scheduler.h, dpm_solver_multistep_scheduler.h), each reproducing its
// class's timesteps, sigmas and update for the keys of a model's scheduler_config.json.
//
// The pipeline drives a sampler as diffusers' StableDiffusionPipeline drives a scheduler:
//   sampler->set_timesteps(steps, device);
//   latents = randn(...) * sampler->init_noise_sigma();
//   for (i = 0; i < sampler->num_steps(); ++i) {
//     out = unet(sampler->scale_model_input(latents, i), sampler->timesteps()[i], context);
//     latents = sampler->step(out, i, latents, generators);
//   }
// Steps must be taken in order from 0: PNDM and DPM-Solver keep a history of model outputs.

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <memory>
#include <string>
#include <vector>

#include "sdtrain/schedulers/noise_schedule.h"
#include "sdtrain/schedulers/scheduler_config.h"

namespace sdtrain::schedulers {

class Sampler {
 public:
  explicit Sampler(const SchedulerConfig& config);
  virtual ~Sampler() = default;
  Sampler(const Sampler&) = delete;
  Sampler& operator=(const Sampler&) = delete;

  // The name make_sampler knows this sampler by ("ddim", "dpm++2m_karras", ...).
  virtual std::string name() const = 0;
  // The diffusers class it reproduces ("DDIMScheduler", ...).
  virtual std::string class_name() const = 0;

  // Places the timesteps for `num_inference_steps` (>= 1, at most num_train_timesteps) and
  // resets the step history. Throws ConfigError for an out-of-range count.
  virtual void set_timesteps(int64_t num_inference_steps, torch::Device device = torch::kCPU) = 0;
  // [num_steps()] on the device given to set_timesteps: int64 for DDIM/PNDM/DPM-Solver, float32
  // for the Euler samplers (their timesteps are fractional with linspace spacing).
  const torch::Tensor& timesteps() const { return timesteps_; }
  int64_t num_steps() const { return timesteps_.defined() ? timesteps_.size(0) : 0; }
  // float32 [num_steps() + 1] on the CPU for the sigma-based samplers (Euler, DPM-Solver);
  // undefined for DDIM/PNDM.
  const torch::Tensor& sigmas() const { return sigmas_; }

  // The standard deviation of the initial latents (1 for DDIM/PNDM/DPM-Solver).
  virtual double init_noise_sigma() const { return 1.0; }
  // The UNet input at step `step_index` (identity except for the Euler samplers).
  virtual torch::Tensor scale_model_input(const torch::Tensor& sample, int64_t step_index);
  // One denoising step from `sample` at step `step_index` given the (guided) model output.
  // `generators`: the noise source of ancestral samplers: empty (the default generator of the
  // sample's device), one shared by the whole batch, or one per batch element (each drawing
  // its element's noise, as diffusers does with a list of generators).
  virtual torch::Tensor step(const torch::Tensor& model_output, int64_t step_index, const torch::Tensor& sample,
                             const std::vector<at::Generator>& generators = {}) = 0;

  const NoiseSchedule& schedule() const { return schedule_; }
  const SchedulerConfig& config() const { return schedule_.config(); }

 protected:
  // Validates the count and records it; throws ConfigError naming the limit.
  void check_step_count(int64_t num_inference_steps);
  // Throws std::logic_error unless step_index is the next step of the sequence.
  void expect_step(int64_t step_index);

  NoiseSchedule schedule_;
  int64_t num_inference_steps_ = 0;
  int64_t next_step_ = 0;
  torch::Tensor timesteps_;
  torch::Tensor sigmas_;
};

// Gaussian noise as diffusers' randn_tensor draws it: on the generators' device (the CPU for a
// CPU generator) in `dtype`, then moved to `device`. One generator draws the whole shape; a
// list of shape[0] generators draws one [1, ...] slice each.
torch::Tensor randn_tensor(at::IntArrayRef shape, const std::vector<at::Generator>& generators,
                           c10::ScalarType dtype, torch::Device device);

// The sampler called `name` for a model whose scheduler_config.json is `model_config`:
//   "" or "default": the model's own class (its _class_name);
//   ddim, pndm, euler, euler_a, dpm++2m, dpm++2m_karras, or the diffusers class names
//   DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler, EulerAncestralDiscreteScheduler,
//   DPMSolverMultistepScheduler (the last honouring the file's use_karras_sigmas); the training
//   configuration's spellings euler_ancestral, dpmsolver++ and dpmsolver++_karras too.
// As diffusers' X.from_config(model_scheduler.config): the keys the file sets are kept, absent
// ones take the chosen class's defaults. Unknown name: ConfigError listing the valid names. A
// model whose own class is not implemented (for "default"): ModelError naming the class.
std::unique_ptr<Sampler> make_sampler(const std::string& name, const SchedulerConfig& model_config);

// The names make_sampler accepts besides "default", in the order the help lists them.
const std::vector<std::string>& sampler_names();

}  // namespace sdtrain::schedulers
