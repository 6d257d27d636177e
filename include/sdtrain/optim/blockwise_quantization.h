#pragma once
// Blockwise 8-bit quantization of optimizer states (CPU reference): the two frozen dynamic maps
// and quantize/dequantize of a flat fp32 tensor in blocks of kQuantizationBlockSize elements,
// one fp32 absmax per block. The rules (nearest code, ties, sign fix, NaN and all-zero blocks)
// live in adam_element_math.h, shared with the CUDA kernels.

#include <torch/torch.h>

#include <array>
#include <cstdint>

#include "sdtrain/optim/adam_element_math.h"

namespace sdtrain::optim {

enum class QmapKind { signed_map, unsigned_map };  // signed: first moment; unsigned: second

// The frozen tables as fp32 values, ascending (qmap_tables.h holds their bit patterns).
const std::array<float, kQmapSize>& qmap(QmapKind kind);
// The same table as a CPU fp32 tensor [256] (a copy).
torch::Tensor qmap_tensor(QmapKind kind);

inline int64_t num_quantization_blocks(int64_t numel) {
  return (numel + kQuantizationBlockSize - 1) / kQuantizationBlockSize;
}

struct QuantizedBlocks {
  torch::Tensor codes;   // uint8 [n]
  torch::Tensor absmax;  // fp32 [ceil(n / 256)]
};

// values: CPU fp32, any shape (flattened row-major). absmax of a block = max |value| over it.
QuantizedBlocks quantize_blockwise(const torch::Tensor& values, QmapKind kind);
// CPU fp32 [n]: table[code] * absmax[block].
torch::Tensor dequantize_blockwise(const QuantizedBlocks& quantized, QmapKind kind);

}  // namespace sdtrain::optim
