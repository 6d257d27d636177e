#include "sdtrain/train/ema.h"

#include <algorithm>
#include <cmath>
#include <sstream>
#include <stdexcept>

#include "sdtrain/util/error.h"

namespace sdtrain::train {
namespace {

std::string shape_text(c10::IntArrayRef shape) {
  std::ostringstream out;
  out << shape;
  return out.str();
}

std::string number_text(double value) {
  std::ostringstream out;
  out.precision(17);
  out << value;
  return out.str();
}

io::NamedTensors parameters_of(const torch::nn::Module& module) {
  io::NamedTensors named;
  for (const auto& item : module.named_parameters(/*recurse=*/true))
    named.emplace_back(item.key(), item.value());
  return named;
}

// The parameters in the shadow's order; a different set is a programming error.
std::vector<torch::Tensor> matching_parameters(const io::NamedTensors& named,
                                               const io::NamedTensors& shadow) {
  if (named.size() != shadow.size()) {
    throw std::invalid_argument("EMAModel: the module has " + std::to_string(named.size()) +
                                " parameters, the EMA shadows " + std::to_string(shadow.size()));
  }
  std::vector<torch::Tensor> parameters;
  for (std::size_t i = 0; i < shadow.size(); ++i) {
    const auto& [key, value] = named[i];
    if (key != shadow[i].first || value.sizes() != shadow[i].second.sizes()) {
      throw std::invalid_argument("EMAModel: parameter " + std::to_string(i) + " is \"" +
                                  key + "\" " + shape_text(value.sizes()) +
                                  ", the EMA has \"" + shadow[i].first + "\" " +
                                  shape_text(shadow[i].second.sizes()));
    }
    parameters.push_back(value);
  }
  return parameters;
}

}  // namespace

double ema_decay_at(const EMAOptions& o, int64_t optimization_step) {
  int64_t t = std::max<int64_t>(0, optimization_step - o.update_after_step - 1);
  if (t <= 0) return 0.0;  // before any clamp, as diffusers: the first update copies
  double steps = static_cast<double>(t);
  double decay = o.use_ema_warmup ? 1.0 - std::pow(1.0 + steps / o.inv_gamma, -o.power)
                                  : (1.0 + steps) / (10.0 + steps);
  decay = std::min(decay, o.decay);
  return std::max(decay, o.min_decay);
}

EMAModel::EMAModel(const torch::nn::Module& module, EMAOptions options, torch::Device device)
    : EMAModel(parameters_of(module), options, device) {}

EMAModel::EMAModel(const io::NamedTensors& parameters, EMAOptions options, torch::Device device)
    : options_(options), device_(device) {
  torch::NoGradGuard no_grad;
  for (const auto& [key, value] : parameters) {
    shadow_.emplace_back(key, value.detach().to(device_, torch::kFloat32, false, /*copy=*/true));
  }
}

void EMAModel::step(const torch::nn::Module& module) { step(parameters_of(module)); }
void EMAModel::copy_to(torch::nn::Module& module) const { copy_to(parameters_of(module)); }
void EMAModel::store(const torch::nn::Module& module) { store(parameters_of(module)); }
void EMAModel::restore(torch::nn::Module& module) { restore(parameters_of(module)); }

void EMAModel::step(const io::NamedTensors& named) {
  auto parameters = matching_parameters(named, shadow_);
  ++optimization_step_;
  current_decay_ = ema_decay_at(options_, optimization_step_);
  double one_minus_decay = 1.0 - current_decay_;
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < parameters.size(); ++i) {
    torch::Tensor& shadow = shadow_[i].second;
    torch::Tensor parameter = parameters[i].detach().to(device_, torch::kFloat32);
    if (parameters[i].requires_grad()) {
      // The same float32 operations, in the same order, as EMAModel's per-tensor update, so the
      // shadows agree to the bit.
      shadow.sub_((shadow - parameter) * one_minus_decay);
    } else {
      shadow.copy_(parameter);
    }
  }
}

void EMAModel::copy_to(const io::NamedTensors& named) const {
  auto parameters = matching_parameters(named, shadow_);
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < parameters.size(); ++i)
    parameters[i].detach().copy_(shadow_[i].second);
}

void EMAModel::store(const io::NamedTensors& named) {
  auto parameters = matching_parameters(named, shadow_);
  stored_.clear();
  for (const auto& parameter : parameters)
    stored_.push_back(
        parameter.detach().to(torch::TensorOptions().device(torch::kCPU), false, /*copy=*/true));
}

void EMAModel::restore(const io::NamedTensors& named) {
  if (stored_.empty() && !shadow_.empty())
    throw std::logic_error("EMAModel::restore() without a store()");
  auto parameters = matching_parameters(named, shadow_);
  torch::NoGradGuard no_grad;
  for (std::size_t i = 0; i < parameters.size(); ++i) parameters[i].detach().copy_(stored_[i]);
  stored_.clear();  // diffusers frees the stored copy too
}

void EMAModel::save(const std::filesystem::path& path) const {
  std::map<std::string, std::string> metadata = {
      {"ema_optimization_step", std::to_string(optimization_step_)},
      {"ema_decay", number_text(options_.decay)},
      {"ema_min_decay", number_text(options_.min_decay)},
      {"ema_update_after_step", std::to_string(options_.update_after_step)},
      {"ema_use_ema_warmup", options_.use_ema_warmup ? "true" : "false"},
      {"ema_inv_gamma", number_text(options_.inv_gamma)},
      {"ema_power", number_text(options_.power)},
  };
  io::save_safetensors(path, shadow_, metadata);
}

void EMAModel::load(const std::filesystem::path& path) {
  io::SafetensorsFile file(path);
  auto error = [&](const std::string& what) {
    return ModelError(path.string() + ": EMA state " + what);
  };
  auto step = file.metadata().find("ema_optimization_step");
  if (step == file.metadata().end())
    throw error("has no \"ema_optimization_step\" in its metadata");
  int64_t loaded_step = 0;
  try {
    std::size_t used = 0;
    loaded_step = std::stoll(step->second, &used);
    if (used != step->second.size() || loaded_step < 0) throw std::invalid_argument(step->second);
  } catch (const std::exception&) {
    throw error("has a malformed \"ema_optimization_step\": \"" + step->second + "\"");
  }
  if (file.tensors().size() != shadow_.size()) {
    throw error("holds " + std::to_string(file.tensors().size()) + " tensors, the model has " +
                std::to_string(shadow_.size()) + " parameters");
  }
  io::NamedTensors loaded;
  for (const auto& [name, tensor] : shadow_) {
    const io::TensorEntry* entry = file.find(name);
    if (!entry) throw error("lacks the tensor \"" + name + "\"");
    torch::Tensor value = file.tensor(name);
    if (value.sizes() != tensor.sizes()) {
      throw error("tensor \"" + name + "\" has shape " + shape_text(value.sizes()) + ", expected " +
                  shape_text(tensor.sizes()));
    }
    loaded.emplace_back(name, value.to(device_, torch::kFloat32, false, /*copy=*/true));
  }
  shadow_ = std::move(loaded);
  optimization_step_ = loaded_step;
  current_decay_ = ema_decay_at(options_, optimization_step_);
}

}  // namespace sdtrain::train
