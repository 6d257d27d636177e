#include "sdtrain/pipeline/stable_diffusion_pipeline.h"

#include <ATen/CPUGeneratorImpl.h>

#include <chrono>

#ifdef SDTRAIN_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/group_norm_silu.h"
#include "sdtrain/models/load_components.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/schedulers/sampler.h"
#include "sdtrain/util/error.h"

namespace sdtrain::pipeline {

namespace {

// Puts modules in eval mode for the lifetime of the guard and restores each one's mode after,
// so the trainer can sample validation images mid-training.
class EvalModeGuard {
 public:
  explicit EvalModeGuard(std::vector<torch::nn::Module*> modules) : modules_(std::move(modules)) {
    for (auto* module : modules_) {
      training_.push_back(module->is_training());
      module->eval();
    }
  }
  ~EvalModeGuard() {
    for (std::size_t i = 0; i < modules_.size(); ++i) modules_[i]->train(training_[i]);
  }
  EvalModeGuard(const EvalModeGuard&) = delete;
  EvalModeGuard& operator=(const EvalModeGuard&) = delete;

 private:
  std::vector<torch::nn::Module*> modules_;
  std::vector<bool> training_;
};

void check_options(const GenerationOptions& options, int64_t width, int64_t height) {
  if (options.prompts.empty()) throw ConfigError("generation needs a prompt");
  if (options.num_images < 1) throw ConfigError("the number of images must be at least 1");
  if (options.batch_size < 1) throw ConfigError("the batch size must be at least 1");
  if (options.decode_batch_size < 0)
    throw ConfigError("the decode batch size must be 0 (the whole batch) or more");
  if (options.prompts.size() != 1 && static_cast<int64_t>(options.prompts.size()) != options.num_images) {
    throw ConfigError("give one prompt, or one per image (" + std::to_string(options.num_images) + "), not " +
                      std::to_string(options.prompts.size()));
  }
  if (options.steps < 1) throw ConfigError("the number of sampling steps must be at least 1, got " + std::to_string(options.steps));
  if (!(options.guidance_scale >= 0)) throw ConfigError("the guidance scale must be 0 or more");
  if (width < 8 || height < 8 || width % 8 || height % 8) {
    throw ConfigError("width and height must be positive multiples of 8 (the VAE's downsampling), got " +
                      std::to_string(width) + "x" + std::to_string(height));
  }
  if (!options.generators.empty() && options.generators.size() != 1 &&
      static_cast<int64_t>(options.generators.size()) != options.num_images) {
    throw ConfigError("give one generator, or one per image");
  }
}

}  // namespace

c10::ScalarType resolve_dtype(const std::string& name, torch::Device device) {
  if (name == "auto" || name.empty()) return device.is_cuda() ? torch::kFloat16 : torch::kFloat32;
  c10::ScalarType dtype;
  if (name == "fp32" || name == "float32" || name == "no") dtype = torch::kFloat32;
  else if (name == "fp16" || name == "float16") dtype = torch::kFloat16;
  else if (name == "bf16" || name == "bfloat16") dtype = torch::kBFloat16;
  else throw ConfigError("unknown dtype \"" + name + "\"; expected auto, fp32, fp16 or bf16");
  if (dtype != torch::kFloat32 && !device.is_cuda()) {
    throw ConfigError("--dtype " + name + " needs a CUDA device; on the CPU sampling runs in fp32");
  }
  return dtype;
}

torch::Device resolve_device(const std::string& name) {
  if (name == "auto" || name.empty()) return torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::kCPU;
  torch::Device device = torch::kCPU;
  try {
    device = torch::Device(name);
  } catch (const std::exception&) {
    throw ConfigError("unknown device \"" + name + "\"; expected auto, cpu or cuda[:N]");
  }
  if (device.is_cuda() && !torch::cuda::is_available()) throw ConfigError("device " + name + ": no CUDA GPU is available");
  if (!device.is_cuda() && !device.is_cpu()) throw ConfigError("device " + name + ": expected cpu or cuda[:N]");
  return device;
}

StableDiffusionPipeline::StableDiffusionPipeline(text::CLIPTokenizer tokenizer, models::CLIPTextModel text_encoder,
                                                 models::UNet2DConditionModel unet, models::AutoencoderKL vae,
                                                 schedulers::SchedulerConfig scheduler_config,
                                                 PipelineSettings settings)
    : tokenizer_(std::move(tokenizer)),
      text_encoder_(std::move(text_encoder)),
      unet_(std::move(unet)),
      vae_(std::move(vae)),
      scheduler_config_(std::move(scheduler_config)),
      settings_(std::move(settings)) {}

StableDiffusionPipeline StableDiffusionPipeline::from_folder(const std::filesystem::path& model_dir,
                                                             const PipelineSettings& settings) {
  return from_folder(models::open_base_model(model_dir, settings.single_file), settings);
}

StableDiffusionPipeline StableDiffusionPipeline::from_folder(const io::ModelFolder& folder,
                                                             const PipelineSettings& settings) {
  for (const auto& name : io::stable_diffusion_components()) folder.require(name);
  const models::LoadOptions load{settings.dtype, settings.device};
  auto scheduler_config = schedulers::SchedulerConfig::from_file(folder.config_path("scheduler"));
  auto tokenizer = text::CLIPTokenizer::from_folder(folder.require("tokenizer").dir);
  models::LoadedComponents loaded =
      models::load_components(folder, {load, load, load, settings.variant});
  for (torch::nn::Module* module :
       std::initializer_list<torch::nn::Module*>{loaded.unet.get(), loaded.vae.get()}) {
    models::set_fused_group_norm_silu(*module, settings.fused_group_norm_silu);
    if (settings.channels_last) models::to_channels_last(*module);
  }
  return StableDiffusionPipeline(std::move(tokenizer), std::move(loaded.text_encoder),
                                 std::move(loaded.unet), std::move(loaded.vae),
                                 std::move(scheduler_config), settings);
}

int64_t StableDiffusionPipeline::default_width() const {
  // diffusers: unet.config.sample_size * vae_scale_factor (2^(VAE levels - 1)).
  const int64_t scale = vae_->config().downsampling_factor();
  return unet_->config().sample_size.value_or(64) * scale;
}

std::string StableDiffusionPipeline::sampler_name(const std::string& scheduler) const {
  return schedulers::make_sampler(scheduler, scheduler_config_)->name();
}

torch::Tensor StableDiffusionPipeline::encode(const std::vector<std::string>& texts) {
  const torch::Tensor ids = tokenizer_.encode_batch(texts).to(settings_.device);  // [B, 77]
  return text_encoder_(ids);                                                     // [B, 77, D]
}

torch::Tensor StableDiffusionPipeline::generate_float(const GenerationOptions& options) {
  const int64_t width = options.width > 0 ? options.width : default_width();
  const int64_t height = options.height > 0 ? options.height : default_height();
  check_options(options, width, height);
  schedulers::make_sampler(options.scheduler, scheduler_config_)->set_timesteps(options.steps);  // validates early

  torch::NoGradGuard no_grad;
  EvalModeGuard eval_mode({text_encoder_.get(), unet_.get(), vae_.get()});
  std::vector<at::Generator> generators = options.generators;
  if (generators.empty()) generators.push_back(at::detail::createCPUGenerator(static_cast<uint64_t>(options.seed)));

  std::vector<torch::Tensor> images;
  for (int64_t first = 0; first < options.num_images; first += options.batch_size) {
    const int64_t count = std::min(options.batch_size, options.num_images - first);
    std::vector<at::Generator> batch_generators;
    if (generators.size() == 1) {
      batch_generators = generators;  // one stream, drawn batch after batch
    } else {
      batch_generators.assign(generators.begin() + first, generators.begin() + first + count);
    }
    images.push_back(generate_batch(options, first, count, batch_generators, width, height, first));
  }
  return torch::cat(images, 0);
}

torch::Tensor StableDiffusionPipeline::generate_batch(const GenerationOptions& options, int64_t first, int64_t count,
                                                      const std::vector<at::Generator>& generators, int64_t width,
                                                      int64_t height, int64_t images_done) {
  const auto started = std::chrono::steady_clock::now();
  std::vector<std::string> prompts;
  for (int64_t i = first; i < first + count; ++i) {
    prompts.push_back(options.prompts.size() == 1 ? options.prompts[0] : options.prompts[i]);
  }
  const bool guidance = options.guidance_scale > 1.0;
  torch::Tensor context = encode(prompts);  // [B, 77, D]
  if (guidance) {
    // diffusers puts the unconditional half first.
    const torch::Tensor negative = encode(std::vector<std::string>(count, options.negative_prompt));
    context = torch::cat({negative, context}, 0);  // [2B, 77, D]
  }

  auto sampler = schedulers::make_sampler(options.scheduler, scheduler_config_);
  sampler->set_timesteps(options.steps, settings_.device);
  // One list element per image draws [1, ...] slices, a single generator the whole batch.
  const std::vector<at::Generator>& noise = generators;
  const int64_t channels = unet_->config().in_channels;
  const int64_t factor = vae_->config().downsampling_factor();
  torch::Tensor latents = schedulers::randn_tensor({count, channels, height / factor, width / factor}, noise,
                                                   settings_.dtype, settings_.device);
  latents = latents * sampler->init_noise_sigma();

  const torch::Tensor timesteps = sampler->timesteps();
  for (int64_t i = 0; i < sampler->num_steps(); ++i) {
    torch::Tensor input = guidance ? torch::cat({latents, latents}, 0) : latents;
    input = sampler->scale_model_input(input, i);
    torch::Tensor prediction = unet_(input, timesteps[i], context);
    if (guidance) {
      auto halves = prediction.chunk(2);
      prediction = halves[0] + options.guidance_scale * (halves[1] - halves[0]);
    }
    latents = sampler->step(prediction, i, latents, noise);
    if (options.progress && i + 1 < sampler->num_steps())
      options.progress({images_done, options.num_images, i + 1, sampler->num_steps(), count});
  }

  torch::Tensor image = decode(latents / vae_->config().scaling_factor, options.decode_batch_size);
  image = (image * 0.5 + 0.5).clamp(0, 1);
  // The copy to the host waits for the GPU: the time below is the batch's whole work.
  image = image.cpu().permute({0, 2, 3, 1}).to(torch::kFloat32).contiguous();  // [B, H, W, 3]
  if (options.progress) {
    const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - started;
    options.progress({images_done, options.num_images, sampler->num_steps(), sampler->num_steps(),
                      count, seconds.count()});
  }
  return image;
}

torch::Tensor StableDiffusionPipeline::decode(const torch::Tensor& latents, int64_t slice) {
  if (slice == 0 || slice >= latents.size(0)) return vae_->decode(latents);  // [B, 3, H, W]
  std::vector<torch::Tensor> images;
  for (const torch::Tensor& part : latents.split(slice)) images.push_back(vae_->decode(part));
  return torch::cat(images);
}

std::vector<io::Image> StableDiffusionPipeline::generate(const GenerationOptions& options) {
  return to_images(generate_float(options));
}

std::vector<io::Image> StableDiffusionPipeline::to_images(const torch::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.size(3) == 3, "to_images expects [N, H, W, 3], got ", images.sizes());
  // numpy: (x * 255) in float32, round half to even, cast to uint8.
  const torch::Tensor bytes = (images.to(torch::kCPU, torch::kFloat32) * 255).round().to(torch::kUInt8).contiguous();
  std::vector<io::Image> out;
  for (int64_t n = 0; n < bytes.size(0); ++n) {
    io::Image image;
    image.height = static_cast<int>(bytes.size(1));
    image.width = static_cast<int>(bytes.size(2));
    const uint8_t* data = bytes[n].data_ptr<uint8_t>();
    image.rgb.assign(data, data + bytes[n].numel());
    out.push_back(std::move(image));
  }
  return out;
}

void release_cached_gpu_memory() {
#ifdef SDTRAIN_WITH_CUDA
  if (torch::cuda::is_available()) c10::cuda::CUDACachingAllocator::emptyCache();
#endif
}

}  // namespace sdtrain::pipeline
