#include "sdtrain/models/lora.h"

#include <stdexcept>

namespace sdtrain::models {

void LoRALinearImpl::attach_adapter(const LoRAOptions& options, at::Generator generator) {
  if (has_adapter()) throw std::logic_error("LoRALinear: an adapter is attached already");
  if (options.rank <= 0) throw std::logic_error("LoRALinear: rank must be positive");
  const auto on = torch::TensorOptions().dtype(torch::kFloat).device(weight.device());
  const int64_t in = weight.size(1), out = weight.size(0);
  lora_A = register_module(
      "lora_A", torch::nn::Linear(torch::nn::LinearOptions(in, options.rank).bias(false)));
  lora_B = register_module(
      "lora_B", torch::nn::Linear(torch::nn::LinearOptions(options.rank, out).bias(false)));
  torch::NoGradGuard no_grad;
  // peft's init_lora_weights="gaussian": normal_(A, std=1/r), zeros_(B).
  lora_A->weight.set_data(at::normal(0.0, 1.0 / static_cast<double>(options.rank),
                                     {options.rank, in}, generator,
                                     torch::TensorOptions().dtype(torch::kFloat))
                              .to(on));
  lora_B->weight.set_data(torch::zeros({out, options.rank}, on));
  scale_ = options.alpha / static_cast<double>(options.rank);
  dropout_ = options.dropout;
}

torch::Tensor LoRALinearImpl::forward(const torch::Tensor& input) {
  torch::Tensor result = torch::nn::LinearImpl::forward(input);
  if (!has_adapter()) return result;
  torch::Tensor x = input;
  if (dropout_ > 0) x = torch::dropout(x, dropout_, is_training());
  // As peft: the input in the adapter's dtype, the sum back in the base result's dtype (under
  // autocast both sides compute in the autocast dtype anyway).
  x = x.to(lora_A->weight.scalar_type());
  return (result + lora_B(lora_A(x)) * scale_).to(result.scalar_type());
}

}  // namespace sdtrain::models
