#include "sdtrain/optim/adamw8bit.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "adamw8bit_cuda.h"
#include "sdtrain/optim/blockwise_quantization.h"
#include "sdtrain/util/error.h"

namespace sdtrain::optim {
namespace {

constexpr const char* kFormatVersion = "1";

bool same_bits(const torch::Tensor& a, const torch::Tensor& b) {
  return a.scalar_type() == torch::kFloat32 && b.scalar_type() == torch::kFloat32 &&
         a.numel() == b.numel() &&
         torch::equal(a.contiguous().view(torch::kInt32), b.contiguous().view(torch::kInt32));
}

// The stored value of an updated element: to nearest (a cast), or for bf16 in lean mode
// stochastically with the element's bits, as the kernels' store_updated does.
template <typename T>
T rounded(float x, const AdamStepConstants&, int64_t) {
  return static_cast<T>(x);
}
template <>
c10::BFloat16 rounded<c10::BFloat16>(float x, const AdamStepConstants& c, int64_t i) {
  if (c.stochastic_rounding == 0) return static_cast<c10::BFloat16>(x);
  return c10::BFloat16(bf16_bits_rounded_stochastically(x, rounding_bits(c.rounding_seed, i)),
                       c10::BFloat16::from_bits());
}

template <typename T>
void dispatch_reference(torch::Tensor& param, const torch::Tensor& grad,
                        AdamW8bit::ParameterState& state, const AdamStepConstants& constants) {
  const int64_t n = param.numel();
  if (state.quantized) {
    adamw8bit_reference_update<T>(param.data_ptr<T>(), grad.data_ptr<T>(),
                                  state.state1.data_ptr<std::uint8_t>(),
                                  state.state2.data_ptr<std::uint8_t>(),
                                  state.absmax1.data_ptr<float>(), state.absmax2.data_ptr<float>(),
                                  n, constants, qmap(QmapKind::signed_map).data(),
                                  qmap(QmapKind::unsigned_map).data());
  } else {
    adamw_fp32_state_reference_update<T>(param.data_ptr<T>(), grad.data_ptr<T>(),
                                         state.state1.data_ptr<float>(),
                                         state.state2.data_ptr<float>(), n, constants);
  }
}

}  // namespace

template <typename T>
void adamw8bit_reference_update(T* param, const T* grad, std::uint8_t* state1,
                                std::uint8_t* state2, float* absmax1, float* absmax2,
                                int64_t n, const AdamStepConstants& c,
                                const float* qmap_signed, const float* qmap_unsigned) {
  const int64_t blocks = num_quantization_blocks(n);
  // Blocks are independent, so splitting them over threads cannot change any result.
  at::parallel_for(0, blocks, 16, [&](int64_t first_block, int64_t end_block) {
    float m[kQuantizationBlockSize];
    float v[kQuantizationBlockSize];
    bool finite[kQuantizationBlockSize];
    for (int64_t b = first_block; b < end_block; ++b) {
      const int64_t begin = b * kQuantizationBlockSize;
      const int count = static_cast<int>(std::min<int64_t>(kQuantizationBlockSize, n - begin));
      // 1. Decode with the OLD block scales and update the moments in fp32. A non-finite
      //    gradient resets the element's moments to 0 (spec 3.3).
      const float old_absmax1 = absmax1[b];
      const float old_absmax2 = absmax2[b];
      float new_absmax1 = 0.0f;
      float new_absmax2 = 0.0f;
      for (int j = 0; j < count; ++j) {
        const int64_t i = begin + j;
        const float g = static_cast<float>(grad[i]);
        finite[j] = is_finite_value(g);
        m[j] = 0.0f;
        v[j] = 0.0f;
        if (finite[j]) {
          m[j] = dequantize(qmap_signed, state1[i], old_absmax1);
          v[j] = dequantize(qmap_unsigned, state2[i], old_absmax2);
          update_moments(g, m[j], v[j], c);
        }
        // 2. New block scales from the updated states, before requantization. Elements past
        //    the end of a partial last block do not exist and contribute nothing.
        new_absmax1 = fmaxf(new_absmax1, fabsf(m[j]));
        new_absmax2 = fmaxf(new_absmax2, fabsf(v[j]));
      }
      absmax1[b] = new_absmax1;
      absmax2[b] = new_absmax2;
      for (int j = 0; j < count; ++j) {
        const int64_t i = begin + j;
        // 3. The parameter moves with the unquantized new m and v; a non-finite gradient
        //    leaves it untouched (no update, no weight decay).
        if (finite[j]) {
          param[i] =
              rounded<T>(updated_parameter(static_cast<float>(param[i]), m[j], v[j], c), c, i);
        }
        // 4. Requantize against the new scales.
        state1[i] = quantize_signed(qmap_signed, m[j], new_absmax1);
        state2[i] = quantize_unsigned(qmap_unsigned, v[j], new_absmax2);
      }
    }
  });
}

template <typename T>
void adamw_fp32_state_reference_update(T* param, const T* grad, float* exp_avg,
                                       float* exp_avg_sq, int64_t n, const AdamStepConstants& c) {
  // Same element rule as the 8-bit path, without quantization.
  for (int64_t i = 0; i < n; ++i) {
    const float g = static_cast<float>(grad[i]);
    if (!is_finite_value(g)) {
      exp_avg[i] = 0.0f;
      exp_avg_sq[i] = 0.0f;
      continue;
    }
    float m = exp_avg[i];
    float v = exp_avg_sq[i];
    update_moments(g, m, v, c);
    exp_avg[i] = m;
    exp_avg_sq[i] = v;
    param[i] = rounded<T>(updated_parameter(static_cast<float>(param[i]), m, v, c), c, i);
  }
}

#define SDTRAIN_INSTANTIATE_REFERENCE(T)                                                   \
  template void adamw8bit_reference_update<T>(T*, const T*, std::uint8_t*, std::uint8_t*, \
                                              float*, float*, int64_t,                    \
                                              const AdamStepConstants&, const float*,     \
                                              const float*);                              \
  template void adamw_fp32_state_reference_update<T>(T*, const T*, float*, float*,        \
                                                     int64_t, const AdamStepConstants&);
SDTRAIN_INSTANTIATE_REFERENCE(float)
SDTRAIN_INSTANTIATE_REFERENCE(c10::Half)
SDTRAIN_INSTANTIATE_REFERENCE(c10::BFloat16)
#undef SDTRAIN_INSTANTIATE_REFERENCE

AdamW8bit::AdamW8bit(NamedParameters parameters, const OptimizerOptions& options)
    : Optimizer(std::move(parameters), options) {
  if (options.min_8bit_size < 1) throw ConfigError("adamw8bit: min_8bit_size must be >= 1");
  states_.reserve(parameters_.size());
  for (const auto& [name, param] : parameters_) {
    const int64_t n = param.numel();
    ParameterState state;
    state.quantized = n >= options.min_8bit_size;
    const auto on_device = torch::TensorOptions().device(param.device());
    if (state.quantized) {
      // Zero codes with zero absmax decode to exactly 0 (spec 2.2).
      state.state1 = torch::zeros({n}, on_device.dtype(torch::kUInt8));
      state.state2 = torch::zeros({n}, on_device.dtype(torch::kUInt8));
      state.absmax1 = torch::zeros({num_quantization_blocks(n)}, on_device.dtype(torch::kFloat32));
      state.absmax2 = torch::zeros({num_quantization_blocks(n)}, on_device.dtype(torch::kFloat32));
    } else {
      state.state1 = torch::zeros({n}, on_device.dtype(torch::kFloat32));
      state.state2 = torch::zeros({n}, on_device.dtype(torch::kFloat32));
    }
    states_.push_back(std::move(state));
  }
}

AdamStepConstants AdamW8bit::step_constants(const OptimizerOptions& options, int64_t step,
                                             size_t index) {
  // Computed in double and rounded once to fp32 (bitsandbytes rounds the hyperparameters to
  // fp32 first and uses fast intrinsics; the difference is within an ulp of each constant).
  const double t = static_cast<double>(step);
  const double bias_correction1 = 1.0 - std::pow(options.beta1, t);
  const double sqrt_bias_correction2 = std::sqrt(1.0 - std::pow(options.beta2, t));
  AdamStepConstants c;
  c.beta1 = static_cast<float>(options.beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - options.beta1);
  c.beta2 = static_cast<float>(options.beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - options.beta2);
  c.step_size = static_cast<float>(-options.lr * sqrt_bias_correction2 / bias_correction1);
  c.eps_hat = static_cast<float>(options.eps * sqrt_bias_correction2);
  c.decay = static_cast<float>(1.0 - options.lr * options.weight_decay);
  if (options.stochastic_rounding) {
    // One stream per (seed, parameter, step): a resumed run draws the bits it would have drawn.
    const auto seed = options.rounding_seed;
    const std::uint32_t run = mix32(static_cast<std::uint32_t>(seed) ^
                                    mix32(static_cast<std::uint32_t>(seed >> 32)));
    const std::uint32_t tensor = mix32(run ^ mix32(static_cast<std::uint32_t>(index) + 1u));
    c.stochastic_rounding = 1;
    c.rounding_seed = mix32(tensor ^ mix32(static_cast<std::uint32_t>(step)));
  }
  return c;
}

AdamW8bit::GradientsByDevice AdamW8bit::gradients_by_device() const {
  GradientsByDevice split;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const torch::Tensor& grad = parameters_[i].second.grad();
    if (!grad.defined()) continue;
    if (!parameters_[i].second.is_cuda()) {
      split.cpu.push_back(i);
      continue;
    }
    check_gradient(i, grad);
    split.cuda.push_back(i);
    split.cuda_grads.push_back(grad);
  }
  return split;
}

void AdamW8bit::step() {
  const GradientsByDevice split = gradients_by_device();
  for (size_t i : split.cpu) step_parameter(i, parameters_[i].second.grad());
  if (!split.cuda.empty()) step_cuda(split.cuda, split.cuda_grads);
}

std::vector<size_t> AdamW8bit::step_unless(const torch::Tensor& skip) {
  const GradientsByDevice split = gradients_by_device();
  if (split.cuda.empty()) return Optimizer::step_unless(skip);
  TORCH_CHECK(split.cpu.empty(), "adamw8bit: step_unless with parameters on the CPU and on CUDA");
  TORCH_CHECK(skip.numel() == 1 && skip.scalar_type() == torch::kFloat32 &&
                  skip.device() == split.cuda_grads.front().device(),
              "adamw8bit: skip must be one float32 on ", split.cuda_grads.front().device());
  step_cuda(split.cuda, split.cuda_grads, skip);
  return split.cuda;
}

void AdamW8bit::step_parameter(size_t index, const torch::Tensor& grad,
                               const torch::Tensor& skip) {
  check_gradient(index, grad);
  if (skip.defined()) {
    TORCH_CHECK(skip.numel() == 1 && skip.scalar_type() == torch::kFloat32 &&
                    skip.device() == grad.device(),
                "adamw8bit: skip must be one float32 on ", grad.device());
  }
  if (parameters_[index].second.is_cuda()) {
    step_cuda({index}, {grad}, skip);
  } else if (skip.defined() && skip.item<float>() != 0.0f) {
    states_[index].step += 1;  // counted, as on CUDA, until the caller retracts it
  } else {
    step_cpu(index, grad);
  }
}

void AdamW8bit::step_cpu(size_t index, const torch::Tensor& grad) {
  torch::NoGradGuard no_grad;
  torch::Tensor param = parameters_[index].second;
  TORCH_CHECK(param.device().is_cpu(), "adamw8bit: parameter '", parameters_[index].first,
              "' is on ", param.device(), "; only CPU and CUDA are supported");
  ParameterState& state = states_[index];
  state.step += 1;
  const AdamStepConstants constants = step_constants(options_, state.step, index);
  const torch::Tensor g = gradient_in_parameter_layout(grad, param);
  switch (param.scalar_type()) {
    case torch::kFloat32:
      dispatch_reference<float>(param, g, state, constants);
      break;
    case torch::kFloat16:
      dispatch_reference<c10::Half>(param, g, state, constants);
      break;
    case torch::kBFloat16:
      dispatch_reference<c10::BFloat16>(param, g, state, constants);
      break;
    default:
      TORCH_CHECK(false, "adamw8bit: unsupported dtype ", param.scalar_type());
  }
}

const std::array<torch::Tensor, 2>& AdamW8bit::device_qmaps(const torch::Device& device) {
  auto found = device_qmaps_.find(device.index());
  if (found == device_qmaps_.end()) {
    found = device_qmaps_
                .emplace(device.index(),
                         std::array<torch::Tensor, 2>{
                             qmap_tensor(QmapKind::signed_map).to(device),
                             qmap_tensor(QmapKind::unsigned_map).to(device)})
                .first;
  }
  return found->second;
}

void AdamW8bit::step_cuda(const std::vector<size_t>& indices,
                          const std::vector<torch::Tensor>& grads, const torch::Tensor& skip) {
#if SDTRAIN_WITH_CUDA
  std::vector<detail::CudaParameterUpdate> updates;
  updates.reserve(indices.size());
  for (size_t k = 0; k < indices.size(); ++k) {
    const size_t i = indices[k];
    ParameterState& state = states_[i];
    device_qmaps(parameters_[i].second.device());
    // A captured step is counted by prepare_replay, when it is replayed.
    if (!capturing_) state.step += 1;
    detail::CudaParameterUpdate update;
    update.index = i;
    update.param = parameters_[i].second;
    update.grad = gradient_in_parameter_layout(grads[k], update.param);
    update.quantized = state.quantized;
    update.state1 = state.state1;
    update.state2 = state.state2;
    update.absmax1 = state.absmax1;
    update.absmax2 = state.absmax2;
    update.constants = step_constants(options_, capturing_ ? state.step + 1 : state.step, i);
    update.skip = skip;
    updates.push_back(std::move(update));
  }
  detail::adamw8bit_update_cuda(updates, device_qmaps_, capturing_ ? &*captured_ : nullptr);
#else
  (void)grads;
  (void)skip;
  TORCH_CHECK(false, "adamw8bit: parameter '", parameters_.at(indices.at(0)).first,
              "' is on CUDA, but this build of sdtrain has no CUDA kernels");
#endif
}

void AdamW8bit::begin_graph_capture() {
#if SDTRAIN_WITH_CUDA
  TORCH_CHECK(!parameters_.empty(), "adamw8bit: nothing to capture");
  const torch::Device device = parameters_.front().second.device();
  for (const auto& [name, parameter] : parameters_) {
    TORCH_CHECK(parameter.device() == device && device.is_cuda(),
                "adamw8bit: a graph capture needs every parameter on one CUDA device; '", name,
                "' is on ", parameter.device());
  }
  device_qmaps(device);  // copied now: a copy from pageable memory cannot be captured
  CapturedArguments captured;
  captured.table.assign(detail::captured_table_bytes(parameters_.size()), 0);
  captured.device = torch::empty({static_cast<int64_t>(captured.table.size())},
                                 torch::TensorOptions().dtype(torch::kUInt8).device(device));
  captured_ = std::move(captured);
  dry_skip_ = torch::ones({1}, torch::TensorOptions().dtype(torch::kFloat32).device(device));
  capturing_ = true;
#else
  Optimizer::begin_graph_capture();
#endif
}

void AdamW8bit::prepare_replay(bool dry) {
  TORCH_CHECK(captured_ && !capturing_, "adamw8bit: prepare_replay needs a finished capture");
  write_replay_arguments(
      *captured_, options_, [this](size_t i) -> int64_t& { return states_.at(i).step; }, dry,
      dry_skip_.data_ptr<float>());
#if SDTRAIN_WITH_CUDA
  detail::upload_captured_arguments(*captured_);
#endif
}

void write_replay_arguments(CapturedArguments& captured, const OptimizerOptions& options,
                            const std::function<int64_t&(size_t)>& step_count, bool dry,
                            const float* dry_skip) {
  for (const CapturedArgument& argument : captured.arguments) {
    int64_t& count = step_count(argument.parameter);
    const int64_t step = count + 1;
    if (!dry) count = step;
    const AdamStepConstants constants =
        AdamW8bit::step_constants(options, step, argument.parameter);
    const float* skip = dry ? dry_skip : argument.skip;
    TORCH_CHECK(argument.constants_at + sizeof constants <= captured.table.size() &&
                    argument.skip_at + sizeof skip <= captured.table.size(),
                "adamw8bit: a captured argument lies outside its table");
    std::memcpy(captured.table.data() + argument.constants_at, &constants, sizeof constants);
    std::memcpy(captured.table.data() + argument.skip_at, &skip, sizeof skip);
  }
}

int64_t AdamW8bit::state_bytes() const {
  int64_t bytes = 0;
  bool any_quantized = false;
  for (const ParameterState& s : states_) {
    bytes += s.state1.nbytes() + s.state2.nbytes();
    if (s.quantized) {
      any_quantized = true;
      bytes += s.absmax1.nbytes() + s.absmax2.nbytes();
    }
  }
  // The two tables, counted once as adamw8bit_state_bytes() does.
  if (any_quantized) bytes += 2 * kQmapSize * static_cast<int64_t>(sizeof(float));
  return bytes;
}

torch::Tensor AdamW8bit::exp_avg(size_t index) const {
  const ParameterState& s = states_.at(index);
  if (!s.quantized) return s.state1.to(torch::kCPU).clone();
  return dequantize_blockwise({s.state1.to(torch::kCPU), s.absmax1.to(torch::kCPU)},
                              QmapKind::signed_map);
}

torch::Tensor AdamW8bit::exp_avg_sq(size_t index) const {
  const ParameterState& s = states_.at(index);
  if (!s.quantized) return s.state2.to(torch::kCPU).clone();
  return dequantize_blockwise({s.state2.to(torch::kCPU), s.absmax2.to(torch::kCPU)},
                              QmapKind::unsigned_map);
}

void AdamW8bit::save_state(io::NamedTensors& tensors,
                           std::map<std::string, std::string>& metadata,
                           const std::string& prefix) const {
  metadata[prefix + "type"] = name();
  metadata[prefix + "format_version"] = kFormatVersion;
  metadata[prefix + "block_size"] = std::to_string(kQuantizationBlockSize);
  metadata[prefix + "min_8bit_size"] = std::to_string(options_.min_8bit_size);
  tensors.emplace_back(prefix + "qmap_signed", qmap_tensor(QmapKind::signed_map));
  tensors.emplace_back(prefix + "qmap_unsigned", qmap_tensor(QmapKind::unsigned_map));
  for (size_t i = 0; i < states_.size(); ++i) {
    const ParameterState& s = states_[i];
    const std::string key = prefix + parameters_[i].first;
    tensors.emplace_back(key + ".step", torch::tensor({s.step}, torch::kInt64));
    if (s.quantized) {
      tensors.emplace_back(key + ".state1", s.state1);
      tensors.emplace_back(key + ".state2", s.state2);
      tensors.emplace_back(key + ".absmax1", s.absmax1);
      tensors.emplace_back(key + ".absmax2", s.absmax2);
    } else {
      tensors.emplace_back(key + ".exp_avg", s.state1);
      tensors.emplace_back(key + ".exp_avg_sq", s.state2);
    }
  }
}

void AdamW8bit::load_state(const io::SafetensorsFile& file, const std::string& prefix) {
  const std::string where = file.path().string() + ": ";
  expect_metadata(file, prefix + "type", name());
  expect_metadata(file, prefix + "format_version", kFormatVersion);
  const auto& metadata = file.metadata();
  const auto block_size = metadata.find(prefix + "block_size");
  if (block_size == metadata.end() ||
      block_size->second != std::to_string(kQuantizationBlockSize)) {
    throw ModelError(
        where + "8-bit optimizer state was saved with quantization block size " +
        (block_size == metadata.end() ? std::string("(none recorded)") : block_size->second) +
        ", this build uses " + std::to_string(kQuantizationBlockSize) +
        "; its absmax values scale other blocks, so it cannot be resumed (start the optimizer "
        "state afresh)");
  }
  expect_metadata(file, prefix + "min_8bit_size", std::to_string(options_.min_8bit_size));
  for (const auto& [key, kind] : {std::pair{std::string("qmap_signed"), QmapKind::signed_map},
                                  std::pair{std::string("qmap_unsigned"), QmapKind::unsigned_map}}) {
    if (file.find(prefix + key) == nullptr || !same_bits(file.tensor(prefix + key), qmap_tensor(kind))) {
      throw ModelError(where + "8-bit optimizer state was saved with a different quantization "
                       "table '" + prefix + key + "' (or none); its codes would decode to other "
                       "values, so it cannot be resumed (start the optimizer state afresh)");
    }
  }
  torch::NoGradGuard no_grad;
  for (size_t i = 0; i < states_.size(); ++i) {
    ParameterState& s = states_[i];
    const std::string key = prefix + parameters_[i].first;
    torch::Tensor step = torch::zeros({1}, torch::kInt64);
    load_tensor_into(file, key + ".step", step);
    if (s.quantized) {
      load_tensor_into(file, key + ".state1", s.state1);
      load_tensor_into(file, key + ".state2", s.state2);
      load_tensor_into(file, key + ".absmax1", s.absmax1);
      load_tensor_into(file, key + ".absmax2", s.absmax2);
    } else {
      load_tensor_into(file, key + ".exp_avg", s.state1);
      load_tensor_into(file, key + ".exp_avg_sq", s.state2);
    }
    s.step = step.item<int64_t>();
  }
}

}  // namespace sdtrain::optim
