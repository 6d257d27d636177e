#pragma once
// Text-to-image sampling as diffusers' StableDiffusionPipeline.__call__ does it, for
// `sdtrain generate`, class images and the trainer's validation images:
//   1. prompts and negative prompts -> CLIP ids (padded to 77) -> text encoder;
//   2. latents = randn([B, 4, H/8, W/8]) from the generators, in the pipeline dtype, drawn on
//      the generators' device (the CPU) and moved, times the sampler's init_noise_sigma;
//   3. per timestep: UNet on [uncond; cond] (classifier-free guidance when guidance_scale > 1),
//      out = uncond + g (cond - uncond), sampler step;
//   4. VAE decode of latents / scaling_factor, (x * 0.5 + 0.5).clamp(0, 1) (output_type "np"),
//      and (x * 255).round() to uint8 as numpy_to_pil does.
// With the same seed, prompts and sampler, the float images equal diffusers' within fp32
// round-off on the CPU (docs/sampling.md gives the measured tolerance).

#include <ATen/core/Generator.h>
#include <torch/torch.h>

#include <filesystem>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/io/image.h"
#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/single_file_config.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/schedulers/scheduler_config.h"
#include "sdtrain/text/clip_tokenizer.h"

namespace sdtrain::pipeline {

struct GenerationProgress {
  int64_t images_done = 0;  // images finished before the current batch
  int64_t images = 0;       // images asked for
  int64_t step = 0;         // steps done in the current batch
  int64_t steps = 0;        // steps per batch
  int64_t batch_images = 0;  // images in the current batch
  // With the batch's last report (step == steps), sent once its images are on the host: the
  // batch's wall time from its prompts' encoding to the copy of its images, VAE decode
  // included (what diffusers' pipeline call does); 0 in the reports before.
  double batch_seconds = 0;
};

struct GenerationOptions {
  // One prompt for every image, or one per image (num_images of them).
  std::vector<std::string> prompts;
  // The unconditional branch of guidance; "" is what diffusers uses without a negative prompt.
  std::string negative_prompt;
  int64_t steps = 50;
  double guidance_scale = 7.5;  // guidance applies only above 1, as in diffusers
  // make_sampler's name: "" / "default" (the model's own scheduler class), ddim, pndm, euler,
  // euler_a, dpm++2m, dpm++2m_karras.
  std::string scheduler;
  // The noise source. Empty: one CPU generator seeded with `seed`. One generator: shared by
  // every image, drawn batch after batch. num_images generators: image i draws from
  // generators[i] (diffusers' list of generators).
  int64_t seed = 0;
  std::vector<at::Generator> generators;
  int64_t width = 0;   // 0: the UNet's sample_size x 8, diffusers' default
  int64_t height = 0;  // multiples of 8
  int64_t num_images = 1;
  int64_t batch_size = 1;  // images per UNet batch (twice that with guidance)
  // Images per VAE decode; 0: the whole batch (diffusers' default). At full resolution the
  // decode's activations are the pipeline's largest transient memory, proportional to this
  // (1: diffusers' enable_vae_slicing), while the UNet's steps keep the batch.
  int64_t decode_batch_size = 0;
  std::function<void(const GenerationProgress&)> progress;
};

// Where and in what precision the pipeline runs: fp32 on the CPU; fp16 or bf16 need CUDA.
struct PipelineSettings {
  torch::Device device = torch::kCPU;
  c10::ScalarType dtype = torch::kFloat32;
  std::string variant;  // weight file variant, e.g. "fp16"
  models::SingleFileOptions single_file;  // for a single-file model (docs/single_file.md)
  // The training config's compute.fused_group_norm_silu and compute.channels_last, for the
  // UNet and VAE of a pipeline from_folder loads (docs/performance.md): class images sample
  // as the run trains, and `generate` takes them as flags.
  bool fused_group_norm_silu = false;
  bool channels_last = false;
};

// "auto" (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16; ConfigError for others and for
// half precision on the CPU.
c10::ScalarType resolve_dtype(const std::string& name, torch::Device device);
// "auto" (CUDA when available), cpu or cuda[:N]; ConfigError when CUDA is asked for but absent.
torch::Device resolve_device(const std::string& name);

class StableDiffusionPipeline {
 public:
  // Components already loaded (the trainer's): they are moved to nothing and keep their dtype;
  // settings.device/dtype say where the latents live and must match the modules.
  StableDiffusionPipeline(text::CLIPTokenizer tokenizer, models::CLIPTextModel text_encoder,
                          models::UNet2DConditionModel unet, models::AutoencoderKL vae,
                          schedulers::SchedulerConfig scheduler_config, PipelineSettings settings);

  // Loads a diffusers model folder (unet, vae, text_encoder, tokenizer, scheduler): ModelError
  // (exit code 3) naming what is missing or wrong.
  static StableDiffusionPipeline from_folder(const std::filesystem::path& model_dir, const PipelineSettings& settings);
  // An opened base (its host copy of the weights, when it keeps one: docs/scaling.md).
  static StableDiffusionPipeline from_folder(const io::ModelFolder& folder, const PipelineSettings& settings);

  // [N, H, W, 3] float32 in [0, 1] on the CPU: diffusers' output_type="np" before rounding.
  // Runs without gradients with every module in eval mode and restores each module's
  // train/eval mode afterwards. ConfigError for invalid options.
  torch::Tensor generate_float(const GenerationOptions& options);
  // The same images as 8-bit RGB.
  std::vector<io::Image> generate(const GenerationOptions& options);

  // (x * 255).round() to uint8, as diffusers' numpy_to_pil. images: [N, H, W, 3] in [0, 1].
  static std::vector<io::Image> to_images(const torch::Tensor& images);

  int64_t default_width() const;
  // The loaded models, for adapters applied onto them (generate --lora).
  models::UNet2DConditionModel& unet() { return unet_; }
  models::CLIPTextModel& text_encoder() { return text_encoder_; }
  int64_t default_height() const { return default_width(); }
  const PipelineSettings& settings() const { return settings_; }
  const schedulers::SchedulerConfig& scheduler_config() const { return scheduler_config_; }
  // The sampler the options' scheduler name resolves to ("pndm", ...), for metadata.
  std::string sampler_name(const std::string& scheduler) const;

 private:
  // [B, 77, D] text embeddings of `texts`.
  torch::Tensor encode(const std::vector<std::string>& texts);
  // [B, 3, H, W] images of the scaled latents, `slice` images per VAE decode (0: all at once).
  torch::Tensor decode(const torch::Tensor& latents, int64_t slice);
  // Images [first, first + count) of the request.
  torch::Tensor generate_batch(const GenerationOptions& options, int64_t first, int64_t count,
                               const std::vector<at::Generator>& generators, int64_t width, int64_t height,
                               int64_t images_done);

  text::CLIPTokenizer tokenizer_;
  models::CLIPTextModel text_encoder_;
  models::UNet2DConditionModel unet_;
  models::AutoencoderKL vae_;
  schedulers::SchedulerConfig scheduler_config_;
  PipelineSettings settings_;
};

// Frees the CUDA caching allocator's unused blocks (after a sampler pipeline is destroyed,
// before training allocates); nothing on a CPU-only build.
void release_cached_gpu_memory();

}  // namespace sdtrain::pipeline
