#pragma once
// A linear layer that can carry a LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation"),
// computed as peft's LoraLayer does for nn.Linear, which diffusers' train_dreambooth_lora.py
// trains:
//   y = W x + b + (alpha / r) · B(A(dropout(x))),   A: [r, in], B: [out, r]
// Without an adapter it is torch::nn::Linear exactly: the same parameters under the same names
// ("weight", "bias") and the same forward, so strict base loading and parity are unchanged.
// attach_adapter() adds lora_A / lora_B as members, so their keys are "<linear>.lora_A.weight"
// and "<linear>.lora_B.weight", the layout of diffusers' LoRA files.

#include <torch/torch.h>

namespace sdtrain::models {

struct LoRAOptions {
  int64_t rank = 4;    // diffusers' default
  double alpha = 4.0;  // diffusers sets lora_alpha = rank: a scale of 1
  double dropout = 0.0;
};

class LoRALinearImpl : public torch::nn::LinearImpl {
 public:
  explicit LoRALinearImpl(const torch::nn::LinearOptions& options)
      : torch::nn::LinearImpl(options) {}

  // Adds an adapter initialised as train_dreambooth_lora.py does (peft's "gaussian"): A drawn
  // from a normal distribution with standard deviation 1/r, B = 0, so the output is unchanged
  // until B trains. The adapter is float32 (it is trained) on the base weight's device.
  // Throws std::logic_error when one is attached already.
  void attach_adapter(const LoRAOptions& options, at::Generator generator);
  bool has_adapter() const { return !lora_A.is_empty(); }
  double adapter_scale() const { return scale_; }

  torch::Tensor forward(const torch::Tensor& input);

  torch::nn::Linear lora_A{nullptr};
  torch::nn::Linear lora_B{nullptr};

 private:
  double scale_ = 0.0;
  double dropout_ = 0.0;
};
TORCH_MODULE(LoRALinear);

}  // namespace sdtrain::models
