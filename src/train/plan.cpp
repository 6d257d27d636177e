#include "sdtrain/train/plan.h"

#include "sdtrain/train/micro_batch_pass.h"

#include <torch/torch.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <sstream>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/autoencoder_kl.h"
#include "sdtrain/models/base_model.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "sdtrain/models/lora_adapters.h"
#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/device_memory.h"
#include "sdtrain/train/lr_schedule.h"
#include "sdtrain/train/memory_plan.h"
#include "sdtrain/train/output_dir.h"
#include "sdtrain/train/trained_set.h"
#include "sdtrain/util/error.h"

namespace sdtrain::train {
namespace fs = std::filesystem;

namespace {

std::string resolve_device(const std::string& requested) {
  if (requested == "cpu") return "cpu";
  bool cuda = torch::cuda::is_available();
  if (requested == "auto") return cuda ? "cuda" : "cpu";
  if (!cuda) {
    throw ConfigError(
        "\"device\": \"" + requested +
        "\" but no CUDA GPU is available to this build "
        "(use \"auto\" or \"cpu\", or build with CUDA on a GPU machine: docs/gpu.md)");
  }
  if (requested.starts_with("cuda:")) {
    int index = std::stoi(requested.substr(5));
    if (index < 0 || index >= static_cast<int>(torch::cuda::device_count())) {
      throw ConfigError("\"device\": \"" + requested + "\" but there are " +
                        std::to_string(torch::cuda::device_count()) + " CUDA devices");
    }
  }
  return requested;
}

// The layers a LoRA run gives adapters in component `name` (none in a full run).
std::vector<std::string> adapter_targets(const TrainConfig& c, const std::string& name) {
  if (c.lora.train_mode != TrainMode::lora) return {};
  if (name == "unet") return c.lora.lora_unet_targets;
  if (name == "text_encoder" && c.train_text_encoder) return models::text_encoder_adapter_targets();
  return {};
}

// An adapter on the layer of weight `tensor` [out, in(, kh, kw)]: A [r, in(, kh, kw)], B [out, r].
void add_adapter_sizes(const io::TensorEntry& tensor, int64_t rank, ComponentSize& size) {
  const auto& shape = tensor.shape;
  const int64_t kernel = shape.size() == 4 ? shape[2] * shape[3] : 1;
  size.adapter_tensor_sizes.push_back(rank * shape[1] * kernel);
  size.adapter_tensor_sizes.push_back(shape[0] * rank);
}

// The module component `name` of a single-file base builds from its config.
std::shared_ptr<torch::nn::Module> build_component(const io::ModelFolder& folder,
                                                           const std::string& name) {
  const std::string source = folder.config_path(name).string();
  if (name == "unet")
    return models::UNet2DConditionModel(
        models::UNet2DConditionConfig::from_json(folder.config(name), source)).ptr();
  if (name == "vae")
    return models::AutoencoderKL(models::AutoencoderKLConfig::from_json(folder.config(name), source)).ptr();
  return models::CLIPTextModel(models::CLIPTextConfig::from_json(folder.config(name), source)).ptr();
}

// The tensors of a component under their diffusers names: the weight headers of a folder; for
// a single-file base (whose names are LDM's) the module its config builds, which is how the
// file will be read (models::from_single_file checks every name and shape against it).
std::vector<io::SafetensorsHeader> component_headers(const io::ModelFolder& folder,
                                                     const std::string& name,
                                                     const std::string& variant) {
  if (!folder.single_file()) return io::read_weight_headers(folder.weights(name, variant));
  io::SafetensorsHeader header;
  for (const auto& [key, tensor] : models::state_dict(*build_component(folder, name)))
    header.tensors.push_back({key, io::SafetensorsDtype::F32, tensor.sizes().vec(), 0, 0});
  return {header};
}

ComponentSize measure_component(const io::ModelFolder& folder, const std::string& name,
                                const TrainConfig& config) {
  folder.config(name);  // must exist and parse
  ComponentSize size{name, 0, {}, {}};
  const std::vector<std::string> targets = adapter_targets(config, name);
  std::set<std::string> matched;
  for (const auto& header : component_headers(folder, name, config.variant)) {
    for (const auto& tensor : header.tensors) {
      size.parameters += tensor.numel();
      size.tensor_sizes.push_back(tensor.numel());
      const bool weight = tensor.name.ends_with(".weight") && tensor.shape.size() >= 2;
      const std::string layer = tensor.name.substr(0, tensor.name.size() - 7);
      for (const auto& target : targets) {
        if (!weight || !models::is_targeted(layer, {target})) continue;
        matched.insert(target);
        add_adapter_sizes(tensor, config.lora.lora_rank, size);
        break;
      }
    }
  }
  for (const auto& target : targets) {
    if (!matched.count(target))
      throw ConfigError("\"lora_unet_targets\": \"" + target + "\" names no layer of " +
                        folder.source().string() + " (" + name + "); remove it");
  }
  return size;
}

void check_tokenizer(const io::ModelFolder& folder) {
  const auto& tokenizer = folder.require("tokenizer");
  for (const char* file : {"vocab.json", "merges.txt"}) {
    if (!fs::exists(tokenizer.dir / file)) {
      throw ModelError((tokenizer.dir / file).string() +
                       ": file not found (the CLIP tokenizer needs vocab.json and merges.txt)");
    }
  }
}

std::vector<ComponentSize> check_model(const TrainConfig& config,
                                       std::vector<std::string>& component_names,
                                       std::vector<std::string>& base_notes) {
  const io::ModelFolder folder =
      models::open_base_model(config.pretrained_model_name_or_path, config.single_file);
  if (const auto* single = folder.single_file()) base_notes = single->notes;
  for (const auto& component : folder.components()) component_names.push_back(component.name);
  for (const auto& name : io::stable_diffusion_components()) folder.require(name);
  folder.config("scheduler");
  check_tokenizer(folder);
  std::vector<ComponentSize> sizes;
  for (const char* name : {"unet", "text_encoder", "vae"})
    sizes.push_back(measure_component(folder, name, config));
  return sizes;
}

void resolve_prompts(TrainConfig& config, const DatasetInfo& info,
                     std::vector<std::string>& warnings) {
  auto pick = [&](std::string& configured, const std::string& from_file, const char* key) {
    if (configured.empty()) {
      configured = from_file;
    } else if (!from_file.empty() && from_file != configured) {
      warnings.push_back(std::string(key) + " from the configuration (\"" + configured +
                         "\") overrides dataset_info.json (\"" + from_file + "\")");
    }
  };
  pick(config.data.instance_prompt, info.instance_prompt, "instance_prompt");
  pick(config.class_images.class_prompt, info.class_prompt, "class_prompt");
  fs::path info_path = fs::path(config.data.instance_data_dir) / "dataset_info.json";
  if (config.data.instance_prompt.empty()) {
    throw InputDataError(info_path.string() +
                         ": no \"instance_prompt\"; add one such as "
                         "\"a photo of sks cat\" (or set instance_prompt in the configuration)");
  }
  if (config.class_images.with_prior_preservation && config.class_images.class_prompt.empty()) {
    throw InputDataError(info_path.string() +
                         ": with_prior_preservation needs a \"class_prompt\" such as "
                         "\"a photo of a cat\" (or set class_prompt in the configuration)");
  }
}

std::string mib(int64_t bytes) {
  std::ostringstream out;
  out.setf(std::ios::fixed);
  out.precision(1);
  out << static_cast<double>(bytes) / (1 << 20) << " MiB";
  return out.str();
}

// Data parallel reduces the gradients after the backward pass; a fused step would apply each
// one before the other processes' gradients arrive. Decided first, so `on` is the user's.
void keep_fused_off_in_data_parallel(TrainingPlan& plan) {
  AutoSwitch& fused = plan.config.compute.fused_backward_pass;
  if (!plan.parallel.launched || fused == AutoSwitch::off) return;
  if (fused == AutoSwitch::on)
    throw ConfigError(
        "\"fused_backward_pass\": true under torchrun: data parallel all-reduces each gradient "
        "after the backward pass, and a fused step would apply it before; set it false");
  fused = AutoSwitch::off;
  plan.setting_notes.push_back(
      "fused_backward_pass off: data parallel reduces gradients after the backward pass");
}

// cuda_graphs: auto captures where nothing stands in the way and says why not on a GPU where
// something does (on the CPU there is nothing to say); true refuses what stands in the way.
void decide_cuda_graphs(TrainingPlan& plan) {
  const AutoSwitch wanted = plan.config.compute.cuda_graphs;
  if (wanted == AutoSwitch::off) return;
  const bool gpu = plan.device != "cpu";
  const auto& lora = plan.config.lora;
  const auto obstacle = cuda_graph_obstacle(
      gpu, plan.parallel.launched, plan.fused_backward_pass, plan.config.optimizer.name,
      plan.config.length.gradient_accumulation_steps,
      lora.train_mode == TrainMode::lora ? lora.lora_dropout : 0.0);
  if (!obstacle) {
    plan.cuda_graphs = true;
    return;
  }
  if (wanted == AutoSwitch::on)
    throw ConfigError("\"cuda_graphs\": true, but " + *obstacle +
                      "; set it to \"auto\" or false");
  if (gpu) plan.setting_notes.push_back("cuda_graphs off: " + *obstacle);
}

// The device of this process: under torchrun, the GPU of its LOCAL_RANK.
std::string process_device(const TrainConfig& config, const DataParallel& parallel) {
  const std::string device = resolve_device(config.device);
  if (!parallel.launched || device == "cpu") return device;
  if (device != "cuda")
    throw ConfigError("\"device\": \"" + config.device +
                      "\" under torchrun: each process trains on cuda:LOCAL_RANK; set \"device\" "
                      "to \"auto\" or \"cuda\" (and CUDA_VISIBLE_DEVICES to choose GPUs)");
  return "cuda:" + std::to_string(parallel.local_rank);
}

// memory_budget, lean mode and fused_backward_pass, decided in that order (each may depend on
// what the one before chose), then the estimate on the settings finally chosen.
void resolve_memory_settings(TrainingPlan& plan) {
  TrainConfig& c = plan.config;
  const bool gpu = plan.device != "cpu";
  const MemoryBudget& budget = c.compute.memory_budget;
  keep_fused_off_in_data_parallel(plan);  // before the budget, which must not count on it
  if (budget.kind != MemoryBudget::Kind::none && !gpu) {
    plan.setting_notes.push_back("memory_budget: training on the CPU, so no setting is changed");
  } else if (budget.kind != MemoryBudget::Kind::none) {
    const int64_t bytes = budget.kind == MemoryBudget::Kind::gib
                              ? static_cast<int64_t>(budget.gib * 1024 * 1024 * 1024)
                              : free_device_memory_bytes(torch::Device(plan.device));
    choose_settings_for_budget(c, plan.components, bytes, plan.setting_notes);
  }
  check_lean_weights(c, plan.setting_notes);
  plan.fused_backward_pass = decide_fused_backward_pass(c, plan.setting_notes);
  decide_cuda_graphs(plan);
  plan.memory = estimate_memory(c, plan.components, gpu, plan.fused_backward_pass);
  // Data parallel's buckets hold a second copy of every gradient (gradient_buckets.h).
  if (plan.parallel.launched) plan.memory.gradients *= 2;
}

}  // namespace

TrainingPlan plan_training(const TrainConfig& config, const DataParallel& parallel) {
  TrainingPlan plan;
  plan.config = config;
  plan.parallel = parallel;
  TrainConfig& c = plan.config;
  plan.device = process_device(c, parallel);
  if (plan.device == "cpu" && c.compute.mixed_precision == Precision::fp16) {
    throw ConfigError(
        "\"mixed_precision\": \"fp16\" needs a CUDA GPU; on CPU use \"no\" or \"bf16\"");
  }

  std::vector<std::string> component_names;
  plan.components = check_model(c, component_names, plan.base_notes);

  DatasetInfo info = read_dataset_info(c.data.instance_data_dir);
  resolve_prompts(c, info, plan.warnings);
  plan.instance_images = check_images(c.data.instance_data_dir);
  for (const auto& image : plan.instance_images) {
    if (std::min(image.width, image.height) < c.data.resolution) {
      plan.warnings.push_back(image.path.filename().string() + " is " +
                              std::to_string(image.width) + "x" + std::to_string(image.height) +
                              ", smaller than resolution " + std::to_string(c.data.resolution) +
                              "; it will be upscaled");
    }
  }

  int64_t instances = static_cast<int64_t>(plan.instance_images.size());
  plan.dataset_length = instances;
  if (c.class_images.with_prior_preservation) {
    if (c.class_images.class_data_dir.empty())
      c.class_images.class_data_dir = (fs::path(c.outputs.output_dir) / "class_images").string();
    if (fs::is_directory(c.class_images.class_data_dir))
      plan.class_images_present =
          static_cast<int64_t>(list_images(c.class_images.class_data_dir).size());
    plan.class_images_to_generate =
        std::max<int64_t>(0, c.class_images.num_class_images - plan.class_images_present);
    // diffusers' DreamBoothDataset: one epoch is max(class images, instance images) samples.
    plan.dataset_length = std::max<int64_t>(instances, c.class_images.num_class_images);
  }
  check_output_dir_is_not_an_input(c, component_names);
  plan.global_batch_size = int64_t{c.length.train_batch_size} * parallel.world_size;
  const int64_t batches = (plan.dataset_length + plan.global_batch_size - 1) / plan.global_batch_size;
  plan.steps_per_epoch =
      (batches + c.length.gradient_accumulation_steps - 1) / c.length.gradient_accumulation_steps;
  plan.total_steps =
      c.length.max_steps ? *c.length.max_steps : c.length.epochs * plan.steps_per_epoch;
  plan.epochs = (plan.total_steps + plan.steps_per_epoch - 1) / plan.steps_per_epoch;
  check_lr_schedule(lr_schedule_options(c, plan.total_steps));  // before any weight loads

  resolve_memory_settings(plan);
  return plan;
}

std::string format_plan(const TrainingPlan& plan) {
  const TrainConfig& c = plan.config;
  std::ostringstream out;
  out << "Plan\n";
  out << "  model:            " << c.pretrained_model_name_or_path << "\n";
  for (const auto& note : plan.base_notes) out << "    single file: " << note << "\n";
  for (const auto& component : plan.components) {
    out << "    " << component.name << ": " << component.parameters << " parameters\n";
  }
  out << "  device:           " << plan.device << " (mixed_precision "
      << to_string(c.compute.mixed_precision) << ")\n";
  out << "  instance images:  " << plan.instance_images.size() << " in " << c.data.instance_data_dir
      << "\n";
  out << "  instance prompt:  \"" << c.data.instance_prompt << "\"\n";
  if (c.class_images.with_prior_preservation) {
    out << "  class prompt:     \"" << c.class_images.class_prompt << "\"\n";
    out << "  class images:     " << plan.class_images_present << " present in "
        << c.class_images.class_data_dir << ", " << plan.class_images_to_generate
        << " to generate (" << c.class_images.prior_generation_steps << " steps, guidance "
        << c.class_images.prior_generation_guidance_scale << ")\n";
  }
  out << "  schedule:         " << plan.total_steps << " optimizer steps = " << plan.epochs
      << " epochs x " << plan.steps_per_epoch << " steps (" << plan.dataset_length
      << " samples/epoch, batch " << c.length.train_batch_size << ", accumulation "
      << c.length.gradient_accumulation_steps << ")\n";
  if (plan.parallel.launched)
    out << "  data parallel:    rank " << plan.parallel.rank << " of " << plan.parallel.world_size
        << " (local rank " << plan.parallel.local_rank << "), global batch "
        << plan.global_batch_size << ", gradients all-reduced in buckets during backward\n";
  if (c.lora.train_mode == TrainMode::lora) {
    int64_t adapters = 0;
    for (const auto& component : plan.components)
      for (int64_t n : component.adapter_tensor_sizes) adapters += n;
    out << "  training:         LoRA adapters (rank " << c.lora.lora_rank << ", alpha "
        << c.lora.alpha() << ") on the UNet" << (c.train_text_encoder ? " and text encoder" : "")
        << ": " << adapters << " parameters; the base frozen\n";
  }
  out << "  optimizer:        " << c.resolved_optimizer() << ", lr " << c.optimizer.learning_rate
      << " (" << c.optimizer.lr_scheduler << ", warmup " << c.optimizer.lr_warmup_steps << ")\n";
  out << "  memory:           fused_backward_pass " << (plan.fused_backward_pass ? "on" : "off")
      << ", weight_dtype " << (c.compute.weight_dtype == Precision::bf16 ? "bf16" : "fp32")
      << ", gradient_checkpointing " << (c.compute.gradient_checkpointing ? "on" : "off")
      << ", cuda_graphs " << (plan.cuda_graphs ? "on" : "off") << "\n";
  for (const auto& note : plan.setting_notes) out << "    " << note << "\n";
  out << "  memory estimate (" << plan.device << ", peak of a step): " << mib(plan.memory.total())
      << "\n"
      << "    trained weights " << mib(plan.memory.trained_weights) << ", gradients "
      << mib(plan.memory.gradients) << ", optimizer state " << mib(plan.memory.optimizer_state)
      << ", frozen weights " << mib(plan.memory.frozen_weights) << ", autocast copies "
      << mib(plan.memory.autocast_copies) << ", activations " << mib(plan.memory.activations)
      << ", EMA weights " << mib(plan.memory.ema_shadow) << "\n";
  out << "  output:           " << c.outputs.output_dir << "\n";
  return out.str();
}

}  // namespace sdtrain::train
