#include "sdtrain/optim/blockwise_quantization.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "sdtrain/optim/qmap_tables.h"

namespace sdtrain::optim {
namespace {

std::array<float, kQmapSize> to_floats(const std::array<std::uint32_t, kQmapSize>& bits) {
  std::array<float, kQmapSize> values{};
  for (int i = 0; i < kQmapSize; ++i) std::memcpy(&values[i], &bits[i], sizeof(float));
  return values;
}

void check_cpu_float(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor (this is the CPU reference)");
  TORCH_CHECK(t.scalar_type() == torch::kFloat32, what, " must be float32, got ", t.scalar_type());
}

}  // namespace

const std::array<float, kQmapSize>& qmap(QmapKind kind) {
  static const std::array<float, kQmapSize> signed_map = to_floats(kQmapSignedBits);
  static const std::array<float, kQmapSize> unsigned_map = to_floats(kQmapUnsignedBits);
  return kind == QmapKind::signed_map ? signed_map : unsigned_map;
}

torch::Tensor qmap_tensor(QmapKind kind) {
  const auto& table = qmap(kind);
  return torch::from_blob(const_cast<float*>(table.data()), {kQmapSize}, torch::kFloat32).clone();
}

QuantizedBlocks quantize_blockwise(const torch::Tensor& values, QmapKind kind) {
  check_cpu_float(values, "quantize_blockwise: values");
  const torch::Tensor flat = values.contiguous().reshape({-1});
  const int64_t n = flat.numel();
  const int64_t blocks = num_quantization_blocks(n);
  QuantizedBlocks out{torch::empty({n}, torch::kUInt8), torch::empty({blocks}, torch::kFloat32)};
  const float* x = flat.data_ptr<float>();
  std::uint8_t* codes = out.codes.data_ptr<std::uint8_t>();
  float* absmax = out.absmax.data_ptr<float>();
  const float* table = qmap(kind).data();
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t begin = b * kQuantizationBlockSize;
    const int64_t end = std::min(n, begin + kQuantizationBlockSize);
    float block_max = 0.0f;
    for (int64_t i = begin; i < end; ++i) block_max = std::fmax(block_max, std::fabs(x[i]));
    absmax[b] = block_max;
    for (int64_t i = begin; i < end; ++i) {
      codes[i] = kind == QmapKind::signed_map ? quantize_signed(table, x[i], block_max)
                                              : quantize_unsigned(table, x[i], block_max);
    }
  }
  return out;
}

torch::Tensor dequantize_blockwise(const QuantizedBlocks& quantized, QmapKind kind) {
  TORCH_CHECK(quantized.codes.scalar_type() == torch::kUInt8 && quantized.codes.device().is_cpu(),
              "dequantize_blockwise: codes must be a CPU uint8 tensor");
  check_cpu_float(quantized.absmax, "dequantize_blockwise: absmax");
  const torch::Tensor codes = quantized.codes.contiguous().reshape({-1});
  const torch::Tensor absmax = quantized.absmax.contiguous();
  const int64_t n = codes.numel();
  TORCH_CHECK(absmax.numel() == num_quantization_blocks(n), "dequantize_blockwise: ", n,
              " codes need ", num_quantization_blocks(n), " absmax values, got ", absmax.numel());
  torch::Tensor out = torch::empty({n}, torch::kFloat32);
  const std::uint8_t* c = codes.data_ptr<std::uint8_t>();
  const float* a = absmax.data_ptr<float>();
  float* y = out.data_ptr<float>();
  const float* table = qmap(kind).data();
  for (int64_t i = 0; i < n; ++i) y[i] = dequantize(table, c[i], a[i / kQuantizationBlockSize]);
  return out;
}

}  // namespace sdtrain::optim
