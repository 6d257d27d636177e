#include "sdtrain/optim/adamw.h"

#include <cmath>

#include "sdtrain/util/error.h"

namespace sdtrain::optim {

AdamW::AdamW(NamedParameters parameters, const OptimizerOptions& options)
    : Optimizer(std::move(parameters), options) {
  if (options.stochastic_rounding) {
    throw ConfigError(
        "optimizer \"adamw\" cannot round bf16 weights stochastically; weight_dtype \"bf16\" "
        "needs \"optimizer\": \"adamw8bit\" (or keep weight_dtype \"fp32\")");
  }
  states_.reserve(parameters_.size());
  // The fused kernel takes float32 tensors on one device; the first parameter that is not.
  const torch::Tensor* first = parameters_.empty() ? nullptr : &parameters_.front().second;
  const std::string* unfit = nullptr;
  bool on_gpu = true;
  for (const auto& [name, param] : parameters_) {
    // The moments take the parameter's layout (a channels-last weight's too): the fused kernel
    // walks each tensor's storage, and its moments must walk in step.
    auto zeros = [&] {
      return torch::zeros_like(param, torch::kFloat32, torch::MemoryFormat::Preserve);
    };
    states_.push_back({0, zeros(), zeros()});
    on_gpu = on_gpu && param.is_cuda();
    if (!unfit && (param.scalar_type() != torch::kFloat32 || param.device() != first->device()))
      unfit = &name;
  }
  fused_kernel_ = options.fused_kernel.value_or(on_gpu && !unfit);
  if (fused_kernel_ && unfit)
    throw ConfigError(
        "optimizer \"adamw\": the fused kernel needs every parameter in float32 on "
        "one device ('" +
        *unfit + "' is not)");
}

void AdamW::step() {
  if (!fused_kernel_) return Optimizer::step();
  fused_step(torch::Tensor());
}

std::vector<size_t> AdamW::step_unless(const torch::Tensor& skip) {
  if (!fused_kernel_) return Optimizer::step_unless(skip);
  return fused_step(skip);
}

std::vector<size_t> AdamW::fused_step(const torch::Tensor& skip) {
  torch::NoGradGuard no_grad;
  std::vector<size_t> stepped;
  std::vector<torch::Tensor> params, grads, exp_avgs, exp_avg_sqs;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const torch::Tensor& param = parameters_[i].second;
    const torch::Tensor& grad = param.grad();
    if (!grad.defined()) continue;  // as torch.optim: no gradient, no step
    check_gradient(i, grad);
    states_[i].step += 1;
    stepped.push_back(i);
    params.push_back(param);
    grads.push_back(gradient_in_parameter_layout(grad, param));
    exp_avgs.push_back(states_[i].exp_avg);
    exp_avg_sqs.push_back(states_[i].exp_avg_sq);
  }
  if (stepped.empty()) return stepped;
  // The kernel reads each parameter's count, already advanced, as a float32 on the device (as
  // torch.optim.AdamW(fused=True) keeps it): written here into pinned memory and copied
  // without waiting. The host counts stay the truth: checkpoints save them.
  const torch::Device device = params.front().device();
  torch::Tensor counts =
      torch::empty({static_cast<int64_t>(stepped.size())},
                   torch::TensorOptions(torch::kFloat32).pinned_memory(device.is_cuda()));
  float* count = counts.data_ptr<float>();
  for (size_t k = 0; k < stepped.size(); ++k)
    count[k] = static_cast<float>(states_[stepped[k]].step);
  const std::vector<torch::Tensor> steps = counts.to(device, /*non_blocking=*/true).unbind(0);
  // The kernel skips on a flag of exactly 1; the loss scaler's may be a sum over groups.
  std::optional<torch::Tensor> found_inf;
  if (skip.defined()) found_inf = skip.ne(0).to(device, torch::kFloat32);
  at::_fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, /*max_exp_avg_sqs=*/{}, steps,
                    options_.lr, options_.beta1, options_.beta2, options_.weight_decay,
                    options_.eps, /*amsgrad=*/false, /*maximize=*/false,
                    /*grad_scale=*/std::nullopt, found_inf);
  return stepped;
}

void AdamW::step_parameter(size_t index, const torch::Tensor& grad, const torch::Tensor& skip) {
  check_gradient(index, grad);
  torch::NoGradGuard no_grad;
  torch::Tensor param = parameters_[index].second;
  State& state = states_[index];
  state.step += 1;
  if (skip.defined()) {
    // Decided on the device: the update runs on copies and is kept only where skip is 0, so
    // no host read is needed; the copies are transient, one parameter's worth.
    const torch::Tensor keep_old = skip.ne(0);
    const torch::Tensor old_param = param.clone();
    const torch::Tensor old_avg = state.exp_avg.clone();
    const torch::Tensor old_avg_sq = state.exp_avg_sq.clone();
    update(param, grad, state);
    param.copy_(torch::where(keep_old, old_param, param));
    state.exp_avg.copy_(torch::where(keep_old, old_avg, state.exp_avg));
    state.exp_avg_sq.copy_(torch::where(keep_old, old_avg_sq, state.exp_avg_sq));
    return;
  }
  update(param, grad, state);
}

void AdamW::update(torch::Tensor& param, const torch::Tensor& grad, State& state) const {
  // fp16/bf16 parameters are updated in fp32 and rounded once; fp32 ones in place.
  const bool is_fp32 = param.scalar_type() == torch::kFloat32;
  torch::Tensor p = is_fp32 ? param : param.to(torch::kFloat32);
  const torch::Tensor g = grad.to(torch::kFloat32);

  const double lr = options_.lr;
  const double beta1 = options_.beta1;
  const double beta2 = options_.beta2;
  const double bias_correction1 = 1.0 - std::pow(beta1, static_cast<double>(state.step));
  const double bias_correction2 = 1.0 - std::pow(beta2, static_cast<double>(state.step));

  // Same sequence of tensor operations as torch.optim.AdamW's single-tensor path.
  p.mul_(1.0 - lr * options_.weight_decay);
  state.exp_avg.lerp_(g, 1.0 - beta1);
  state.exp_avg_sq.mul_(beta2).addcmul_(g, g, 1.0 - beta2);
  const torch::Tensor denominator =
      (state.exp_avg_sq.sqrt() / std::sqrt(bias_correction2)).add_(options_.eps);
  p.addcdiv_(state.exp_avg, denominator, -lr / bias_correction1);
  if (!is_fp32) param.copy_(p);
}

int64_t AdamW::state_bytes() const {
  int64_t bytes = 0;
  for (const State& s : states_) bytes += s.exp_avg.nbytes() + s.exp_avg_sq.nbytes();
  return bytes;
}

void AdamW::save_state(io::NamedTensors& tensors, std::map<std::string, std::string>& metadata,
                       const std::string& prefix) const {
  metadata[prefix + "type"] = name();
  metadata[prefix + "format_version"] = "1";
  for (size_t i = 0; i < states_.size(); ++i) {
    const std::string key = prefix + parameters_[i].first;
    tensors.emplace_back(key + ".step", torch::tensor({states_[i].step}, torch::kInt64));
    tensors.emplace_back(key + ".exp_avg", states_[i].exp_avg);
    tensors.emplace_back(key + ".exp_avg_sq", states_[i].exp_avg_sq);
  }
}

void AdamW::load_state(const io::SafetensorsFile& file, const std::string& prefix) {
  expect_metadata(file, prefix + "type", name());
  expect_metadata(file, prefix + "format_version", "1");
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < states_.size(); ++i) {
    const std::string key = prefix + parameters_[i].first;
    torch::Tensor step = torch::zeros({1}, torch::kInt64);
    load_tensor_into(file, key + ".step", step);
    load_tensor_into(file, key + ".exp_avg", states_[i].exp_avg);
    load_tensor_into(file, key + ".exp_avg_sq", states_[i].exp_avg_sq);
    states_[i].step = step.item<int64_t>();
  }
}

}  // namespace sdtrain::optim
