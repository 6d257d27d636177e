#include "sdtrain/optim/optimizer.h"

#include <sstream>
#include <stdexcept>

#include "sdtrain/optim/adamw.h"
#include "sdtrain/optim/adamw8bit.h"
#include "sdtrain/optim/blockwise_quantization.h"
#include "sdtrain/util/error.h"

namespace sdtrain::optim {

Optimizer::Optimizer(NamedParameters parameters, const OptimizerOptions& options)
    : parameters_(std::move(parameters)), options_(options) {
  if (!(options.lr >= 0.0)) throw ConfigError("optimizer: learning rate must be >= 0");
  if (!(options.beta1 >= 0.0 && options.beta1 < 1.0) ||
      !(options.beta2 >= 0.0 && options.beta2 < 1.0)) {
    throw ConfigError("optimizer: adam_beta1 and adam_beta2 must be in [0, 1)");
  }
  if (!(options.eps > 0.0)) throw ConfigError("optimizer: adam_epsilon must be > 0");
  if (!(options.weight_decay >= 0.0)) throw ConfigError("optimizer: weight decay must be >= 0");
  for (const auto& [name, param] : parameters_) {
    if (!param.defined()) throw ConfigError("optimizer: parameter '" + name + "' is undefined");
    const auto type = param.scalar_type();
    if (type != torch::kFloat32 && type != torch::kFloat16 && type != torch::kBFloat16) {
      throw ConfigError("optimizer: parameter '" + name +
                        "' must be float32, float16 or bfloat16, got " +
                        std::string(c10::toString(type)));
    }
    if (!param.is_non_overlapping_and_dense()) {
      throw ConfigError("optimizer: parameter '" + name +
                        "' must be dense (contiguous, or channels-last)");
    }
  }
}

torch::Tensor gradient_in_parameter_layout(const torch::Tensor& grad, const torch::Tensor& param) {
  if (grad.strides() == param.strides()) return grad;
  return torch::empty_like(param, grad.options(), at::MemoryFormat::Preserve).copy_(grad);
}

void Optimizer::step() {
  for (size_t i = 0; i < parameters_.size(); ++i) step_parameter(i);
}

std::vector<size_t> Optimizer::step_unless(const torch::Tensor& skip) {
  if (skip.item<float>() == 0.0f) step();
  return {};
}

void Optimizer::step_parameter(size_t index) {
  const torch::Tensor& grad = parameters_.at(index).second.grad();
  if (grad.defined()) step_parameter(index, grad);
}

void Optimizer::begin_graph_capture() {
  throw std::logic_error("optimizer " + name() + ": its steps cannot be captured in a CUDA graph");
}

void Optimizer::zero_grad(bool set_to_none) {
  for (auto& [name, param] : parameters_) {
    torch::Tensor& grad = param.mutable_grad();
    if (!grad.defined()) continue;
    if (set_to_none) {
      grad = torch::Tensor();
    } else {
      grad.detach_();
      grad.zero_();
    }
  }
}

void Optimizer::check_gradient(size_t index, const torch::Tensor& grad) const {
  TORCH_CHECK(index < parameters_.size(), "optimizer: parameter index ", index,
              " out of range (", parameters_.size(), " parameters)");
  const auto& [name, param] = parameters_[index];
  TORCH_CHECK(grad.defined(), "optimizer: gradient of '", name, "' is undefined");
  TORCH_CHECK(grad.sizes() == param.sizes(), "optimizer: gradient of '", name, "' has shape ",
              grad.sizes(), ", parameter has ", param.sizes());
  TORCH_CHECK(grad.scalar_type() == param.scalar_type(), "optimizer: gradient of '", name,
              "' is ", grad.scalar_type(), ", parameter is ", param.scalar_type());
  TORCH_CHECK(grad.device() == param.device(), "optimizer: gradient of '", name, "' is on ",
              grad.device(), ", parameter on ", param.device());
}

void Optimizer::expect_metadata(const io::SafetensorsFile& file, const std::string& key,
                                const std::string& expected) {
  const auto& metadata = file.metadata();
  const auto found = metadata.find(key);
  if (found == metadata.end()) {
    throw ModelError(file.path().string() + ": optimizer state has no metadata '" + key +
                     "' (expected '" + expected + "')");
  }
  if (found->second != expected) {
    throw ModelError(file.path().string() + ": optimizer state has " + key + " = '" +
                     found->second + "', this optimizer needs '" + expected + "'");
  }
}

void Optimizer::load_tensor_into(const io::SafetensorsFile& file, const std::string& key,
                                 torch::Tensor& destination) {
  const io::TensorEntry* entry = file.find(key);
  if (entry == nullptr) {
    throw ModelError(file.path().string() + ": optimizer state tensor '" + key + "' is missing");
  }
  const torch::Tensor source = file.tensor(key);
  if (source.scalar_type() != destination.scalar_type() ||
      source.numel() != destination.numel()) {
    std::ostringstream message;
    message << file.path().string() << ": optimizer state tensor '" << key << "' is "
            << source.scalar_type() << " " << source.sizes() << ", expected "
            << destination.scalar_type() << " " << destination.sizes();
    throw ModelError(message.str());
  }
  torch::NoGradGuard no_grad;
  destination.copy_(source.reshape(destination.sizes()));
}

std::unique_ptr<Optimizer> make_optimizer(const std::string& name, NamedParameters parameters,
                                          const OptimizerOptions& options) {
  if (name == "adamw") return std::make_unique<AdamW>(std::move(parameters), options);
  if (name == "adamw8bit") return std::make_unique<AdamW8bit>(std::move(parameters), options);
  throw ConfigError("unknown optimizer '" + name + "' (valid: \"adamw\", \"adamw8bit\")");
}

int64_t adamw_state_bytes(const std::vector<int64_t>& numels) {
  int64_t bytes = 0;
  for (int64_t n : numels) bytes += 2 * n * static_cast<int64_t>(sizeof(float));
  return bytes;
}

int64_t adamw8bit_state_bytes(const std::vector<int64_t>& numels, int64_t min_8bit_size) {
  int64_t bytes = 0;
  bool any_quantized = false;
  for (int64_t n : numels) {
    if (n < min_8bit_size) {
      bytes += 2 * n * static_cast<int64_t>(sizeof(float));  // fp32 m and v
    } else {
      any_quantized = true;
      // uint8 m and v codes plus one fp32 absmax per block and state.
      bytes += 2 * n + 2 * num_quantization_blocks(n) * static_cast<int64_t>(sizeof(float));
    }
  }
  // The two 256-entry fp32 tables, held once by the optimizer.
  if (any_quantized) bytes += 2 * kQmapSize * static_cast<int64_t>(sizeof(float));
  return bytes;
}

}  // namespace sdtrain::optim
