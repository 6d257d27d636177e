#include "sdtrain/models/lora.h"

#include <stdexcept>

namespace sdtrain::models {

namespace lora_detail {

void check_new_adapter(bool attached, const LoRAOptions& options) {
  if (attached) throw std::logic_error("LoRA: an adapter is attached already");
  if (options.rank <= 0) throw std::logic_error("LoRA: rank must be positive");
}

void gaussian_init(torch::Tensor& a, torch::Tensor& b, torch::Device device, int64_t rank,
                   at::Generator generator) {
  torch::NoGradGuard no_grad;
  const auto on = torch::TensorOptions().dtype(torch::kFloat).device(device);
  a.set_data(at::normal(0.0, 1.0 / static_cast<double>(rank), a.sizes(), generator,
                        torch::TensorOptions().dtype(torch::kFloat))
                 .to(on));
  b.set_data(torch::zeros(b.sizes(), on));
}

}  // namespace lora_detail

torch::Tensor LoRAState::adapter_input(const torch::Tensor& x, c10::ScalarType dtype,
                                       bool training) const {
  torch::Tensor input = x;
  if (options_.dropout > 0) input = torch::dropout(input, options_.dropout, training);
  return input.to(dtype);
}

void LoRALinearImpl::attach_adapter(const LoRAOptions& options, at::Generator generator) {
  lora_detail::check_new_adapter(has_adapter(), options);
  const int64_t in = weight.size(1), out = weight.size(0);
  add_adapter(torch::nn::Linear(torch::nn::LinearOptions(in, options.rank).bias(false)),
              torch::nn::Linear(torch::nn::LinearOptions(options.rank, out).bias(false)), options,
              generator);
}

void LoRAConv2dImpl::attach_adapter(const LoRAOptions& options, at::Generator generator) {
  lora_detail::check_new_adapter(has_adapter(), options);
  const auto& base = this->options;
  add_adapter(
      torch::nn::Conv2d(
          torch::nn::Conv2dOptions(base.in_channels(), options.rank, base.kernel_size())
              .stride(base.stride())
              .padding(base.padding())
              .bias(false)),
      torch::nn::Conv2d(torch::nn::Conv2dOptions(options.rank, base.out_channels(), 1).bias(false)),
      options, generator);
}

}  // namespace sdtrain::models
