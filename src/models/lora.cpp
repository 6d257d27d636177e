#include "sdtrain/models/lora.h"

#include <stdexcept>

namespace sdtrain::models {
namespace {

void check_new_adapter(bool attached, const LoRAOptions& options) {
  if (attached) throw std::logic_error("LoRA: an adapter is attached already");
  if (options.rank <= 0) throw std::logic_error("LoRA: rank must be positive");
}

// peft's init_lora_weights="gaussian": normal_(A, std=1/r), zeros_(B); drawn on the CPU from
// `generator` so the values do not depend on the device.
void gaussian_init(torch::Tensor& a, torch::Tensor& b, torch::Device device, int64_t rank,
                   at::Generator generator) {
  torch::NoGradGuard no_grad;
  const auto on = torch::TensorOptions().dtype(torch::kFloat).device(device);
  a.set_data(at::normal(0.0, 1.0 / static_cast<double>(rank), a.sizes(), generator,
                        torch::TensorOptions().dtype(torch::kFloat))
                 .to(on));
  b.set_data(torch::zeros(b.sizes(), on));
}

}  // namespace

torch::Tensor LoRAState::adapter_input(const torch::Tensor& x, c10::ScalarType dtype,
                                       bool training) const {
  torch::Tensor input = x;
  if (options_.dropout > 0) input = torch::dropout(input, options_.dropout, training);
  return input.to(dtype);
}

void LoRALinearImpl::attach_adapter(const LoRAOptions& options, at::Generator generator) {
  check_new_adapter(has_adapter(), options);
  const int64_t in = weight.size(1), out = weight.size(0);
  lora_A = register_module(
      "lora_A", torch::nn::Linear(torch::nn::LinearOptions(in, options.rank).bias(false)));
  lora_B = register_module(
      "lora_B", torch::nn::Linear(torch::nn::LinearOptions(options.rank, out).bias(false)));
  gaussian_init(lora_A->weight, lora_B->weight, weight.device(), options.rank, generator);
  state_.set(options);
}

void LoRALinearImpl::remove_adapter() {
  if (!has_adapter()) return;
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A = nullptr;
  lora_B = nullptr;
}

torch::Tensor LoRALinearImpl::forward(const torch::Tensor& input) {
  torch::Tensor result = torch::nn::LinearImpl::forward(input);
  if (!has_adapter()) return result;
  // As peft: the input in the adapter's dtype, the sum back in the base result's dtype (under
  // autocast both sides compute in the autocast dtype anyway).
  const torch::Tensor x = state_.adapter_input(input, lora_A->weight.scalar_type(), is_training());
  return (result + lora_B(lora_A(x)) * state_.scale()).to(result.scalar_type());
}

void LoRAConv2dImpl::attach_adapter(const LoRAOptions& options, at::Generator generator) {
  check_new_adapter(has_adapter(), options);
  const auto& base = this->options;
  lora_A = register_module(
      "lora_A", torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(base.in_channels(), options.rank, base.kernel_size())
                        .stride(base.stride())
                        .padding(base.padding())
                        .bias(false)));
  lora_B = register_module(
      "lora_B", torch::nn::Conv2d(
                    torch::nn::Conv2dOptions(options.rank, base.out_channels(), 1).bias(false)));
  gaussian_init(lora_A->weight, lora_B->weight, weight.device(), options.rank, generator);
  state_.set(options);
}

void LoRAConv2dImpl::remove_adapter() {
  if (!has_adapter()) return;
  unregister_module("lora_A");
  unregister_module("lora_B");
  lora_A = nullptr;
  lora_B = nullptr;
}

torch::Tensor LoRAConv2dImpl::forward(const torch::Tensor& input) {
  torch::Tensor result = torch::nn::Conv2dImpl::forward(input);
  if (!has_adapter()) return result;
  const torch::Tensor x = state_.adapter_input(input, lora_A->weight.scalar_type(), is_training());
  return (result + lora_B(lora_A(x)) * state_.scale()).to(result.scalar_type());
}

}  // namespace sdtrain::models
