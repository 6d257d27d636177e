#include "sdtrain/train/memory_plan.h"

#include <algorithm>
#include <functional>
#include <sstream>

#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/trained_set.h"
#include "sdtrain/util/error.h"

namespace sdtrain::train {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// Activations per sample of SD 2.1-base's UNet (865.9 M parameters) at 512x512 under autocast,
// from the H100 measurements quoted in issue 15 (diffusers' UNet alone, batch 2): 1.1 GiB
// with gradient checkpointing and 10.7 - 6.45 - 1.61 = 2.6 GiB without (total minus fp32
// weights and gradients minus the fp16 weight copies saved for backward). Scaled by pixels,
// samples and UNet size; the benchmark program checks the estimate against measured peaks.
constexpr double kActivationBytesPerSampleCheckpointed = 0.55 * kGiB;
constexpr double kActivationBytesPerSample = 1.3 * kGiB;
constexpr double kReferenceUNetParameters = 865.9e6;

std::string gib(int64_t bytes) {
  std::ostringstream out;
  out.setf(std::ios::fixed);
  out.precision(2);
  out << static_cast<double>(bytes) / kGiB << " GiB";
  return out.str();
}

bool trains(const TrainConfig& c, const std::string& name) {
  const auto names = trained_component_names(c);
  return std::find(names.begin(), names.end(), name) != names.end();
}

int64_t largest_two(std::vector<int64_t> sizes) {
  std::sort(sizes.rbegin(), sizes.rend());
  int64_t sum = 0;
  for (size_t i = 0; i < sizes.size() && i < 2; ++i) sum += sizes[i];
  return sum;
}

int64_t optimizer_bytes(const TrainConfig& c, const std::vector<int64_t>& sizes) {
  return c.resolved_optimizer() == "adamw8bit" ? optim::adamw8bit_state_bytes(sizes)
                                               : optim::adamw_state_bytes(sizes);
}

// Whether a frozen component leaves the device once what it computes is cached (the trainer's
// release_frozen_models): the VAE after cache_latents, the text encoder when not trained.
bool leaves_device(const TrainConfig& c, const std::string& name, bool gpu) {
  if (!gpu) return false;
  if (name == "vae") return c.data.cache_latents;
  if (name == "text_encoder") return !c.train_text_encoder;
  return false;
}

}  // namespace

bool decide_fused_backward_pass(const TrainConfig& c, std::vector<std::string>& notes) {
  const AutoSwitch requested = c.compute.fused_backward_pass;
  if (requested == AutoSwitch::off) return false;
  const int accumulation = c.length.gradient_accumulation_steps;
  const bool clips = c.optimizer.max_grad_norm > 0;
  const bool fp16 = c.compute.mixed_precision == Precision::fp16;
  if (requested == AutoSwitch::automatic) {
    if (accumulation > 1 || clips || fp16) return false;
    notes.push_back(
        "fused_backward_pass auto: on (no clipping, no fp16 loss scaling, no accumulation: the "
        "result is the unfused step's, and the gradients are never all held)");
    return true;
  }
  if (accumulation > 1) {
    throw ConfigError(
        "\"fused_backward_pass\" steps each parameter inside the backward pass, but "
        "\"gradient_accumulation_steps\": " +
        std::to_string(accumulation) +
        " sums that many backward passes before a step; set gradient_accumulation_steps 1 (and "
        "raise train_batch_size) or fused_backward_pass false");
  }
  if (clips) {
    std::ostringstream line;
    line << "fused_backward_pass: max_grad_norm " << c.optimizer.max_grad_norm
         << " clips each tensor's gradient by its own norm (the global norm needs every gradient "
            "at once); set max_grad_norm 0 for no clipping, or fused_backward_pass false";
    notes.push_back(line.str());
  }
  if (fp16) {
    notes.push_back(
        "fused_backward_pass with fp16: a step that overflows skips only the tensors whose "
        "gradients are inf/NaN (the others were stepped as their gradients arrived) and the "
        "loss scale backs off as usual; bf16 has no loss scale and no skipped steps");
  }
  return true;
}

void check_lean_weights(const TrainConfig& c, std::vector<std::string>& notes) {
  if (c.compute.weight_dtype != Precision::bf16) return;
  if (c.lora.train_mode == TrainMode::lora) {
    throw ConfigError(
        "\"weight_dtype\": \"bf16\" stores fully trained weights in bf16; a LoRA run's adapters "
        "are small and stay fp32: remove weight_dtype or use train_mode \"full\"");
  }
  if (c.resolved_optimizer() != "adamw8bit") {
    throw ConfigError(
        "\"weight_dtype\": \"bf16\" needs \"optimizer\": \"adamw8bit\", whose kernels round the "
        "updated weights stochastically (round-to-nearest would lose updates smaller than half "
        "a bf16 step)");
  }
  if (c.compute.mixed_precision == Precision::fp32) {
    throw ConfigError(
        "\"weight_dtype\": \"bf16\" needs \"mixed_precision\" \"bf16\" or \"fp16\": the forward "
        "pass computes in the autocast dtype, and fp32 layers cannot take bf16 weights");
  }
  notes.push_back(
      "weight_dtype bf16 (lean mode): the trained weights are held in bf16 and rounded "
      "stochastically after each update (no fp32 master copy); checkpoints store them exactly");
}

MemoryEstimate estimate_memory(const TrainConfig& c, const std::vector<ComponentSize>& sizes,
                               bool gpu, bool fused) {
  MemoryEstimate m;
  const bool lora = c.lora.train_mode == TrainMode::lora;
  const bool half_autocast = c.compute.mixed_precision != Precision::fp32;
  const int64_t frozen_bytes = gpu || half_autocast ? 2 : 4;
  const int64_t trained_bytes = c.compute.weight_dtype == Precision::bf16 ? 2 : 4;
  int64_t unet_parameters = 0;
  for (const auto& component : sizes) {
    if (component.name == "unet") unet_parameters = component.parameters;
    const bool trained = trains(c, component.name);
    std::vector<int64_t> trained_tensors;
    if (trained && lora) {
      trained_tensors = component.adapter_tensor_sizes;
      if (!leaves_device(c, component.name, gpu))
        m.frozen_weights += frozen_bytes * component.parameters;
    } else if (trained) {
      trained_tensors = component.tensor_sizes;
    } else if (!leaves_device(c, component.name, gpu)) {
      m.frozen_weights += frozen_bytes * component.parameters;
    }
    if (trained_tensors.empty()) continue;
    const int64_t bytes = lora ? 4 : trained_bytes;
    int64_t parameters = 0;
    for (int64_t n : trained_tensors) parameters += n;
    m.trained_weights += bytes * parameters;
    m.gradients += bytes * (fused ? largest_two(trained_tensors) : parameters);
    m.optimizer_state += optimizer_bytes(c, trained_tensors);
    // EMA shadows what the UNet trains (its adapters in LoRA mode), in float32.
    if (component.name == "unet" && c.ema.use_ema && !c.ema.offload_ema && gpu)
      m.ema_shadow += 4 * parameters;
    // Without checkpointing autograd keeps the half copy of every trained weight a layer cast
    // for its forward until that layer's backward (bf16 weights under bf16 need none).
    const bool casts = half_autocast && !lora &&
                       !(c.compute.weight_dtype == Precision::bf16 &&
                         c.compute.mixed_precision == Precision::bf16);
    if (casts && gpu && !c.compute.gradient_checkpointing) m.autocast_copies += 2 * parameters;
  }
  const double samples =
      c.length.train_batch_size * (c.class_images.with_prior_preservation ? 2.0 : 1.0);
  const double pixels =
      static_cast<double>(c.data.resolution) * c.data.resolution / (512.0 * 512.0);
  const double per_sample = c.compute.gradient_checkpointing ? kActivationBytesPerSampleCheckpointed
                                                             : kActivationBytesPerSample;
  if (gpu)
    m.activations =
        static_cast<int64_t>(per_sample * samples * pixels *
                             (static_cast<double>(unet_parameters) / kReferenceUNetParameters));
  return m;
}

void choose_settings_for_budget(TrainConfig& c, const std::vector<ComponentSize>& sizes,
                                int64_t budget_bytes, std::vector<std::string>& notes) {
  const bool full = c.lora.train_mode == TrainMode::full;
  // The decision the plan will take for each candidate, so the budget and --dry-run agree
  // (an "auto" that the rules turn on counts as on; its notes are the plan's to print).
  auto estimate = [&](const TrainConfig& candidate) {
    std::vector<std::string> unused;
    return estimate_memory(candidate, sizes, true, decide_fused_backward_pass(candidate, unused))
        .total();
  };
  // From the most faithful to the leanest; each step keeps the ones before it.
  struct Step {
    std::string what;
    std::function<bool(TrainConfig&)> apply;  // false: not applicable to this run
  };
  const std::vector<Step> steps = {
      {"offload_ema on (the EMA weights leave the GPU)",
       [](TrainConfig& t) {
         if (!t.ema.use_ema || t.ema.offload_ema) return false;
         return t.ema.offload_ema = true;
       }},
      {"gradient_checkpointing on",
       [](TrainConfig& t) {
         if (t.compute.gradient_checkpointing) return false;
         return t.compute.gradient_checkpointing = true;
       }},
      {"optimizer adamw8bit",
       [](TrainConfig& t) {
         if (t.resolved_optimizer() == "adamw8bit") return false;
         t.optimizer.name = "adamw8bit";
         return true;
       }},
      {"cache_latents on (the VAE leaves the GPU)",
       [](TrainConfig& t) {
         if (t.data.cache_latents || t.data.random_flip || !t.data.center_crop) return false;
         return t.data.cache_latents = true;
       }},
      {"fused_backward_pass on",
       [](TrainConfig& t) {
         if (t.compute.fused_backward_pass == AutoSwitch::off ||
             t.compute.fused_backward_pass == AutoSwitch::on ||
             t.length.gradient_accumulation_steps > 1)
           return false;
         t.compute.fused_backward_pass = AutoSwitch::on;
         return true;
       }},
      {"weight_dtype bf16 (lean mode)",
       [full](TrainConfig& t) {
         if (!full || t.compute.weight_dtype == Precision::bf16 ||
             t.compute.mixed_precision == Precision::fp32)
           return false;
         t.compute.weight_dtype = Precision::bf16;
         return true;
       }},
  };
  int64_t bytes = estimate(c);
  if (bytes <= budget_bytes) {
    notes.push_back("memory_budget " + gib(budget_bytes) +
                    ": the settings as given fit (estimate " + gib(bytes) + ")");
    return;
  }
  for (const Step& step : steps) {
    TrainConfig candidate = c;
    if (!step.apply(candidate)) continue;
    const int64_t after = estimate(candidate);
    notes.push_back("memory_budget " + gib(budget_bytes) + ": " + step.what + " (estimate " +
                    gib(bytes) + " -> " + gib(after) + ")");
    c = candidate;
    bytes = after;
    if (bytes <= budget_bytes) return;
  }
  throw ConfigError("\"memory_budget\": even the leanest settings need an estimated " + gib(bytes) +
                    ", over the budget of " + gib(budget_bytes) +
                    "; lower resolution or train_batch_size, use train_mode \"lora\", or raise "
                    "memory_budget");
}

}  // namespace sdtrain::train
