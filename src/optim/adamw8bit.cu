// CUDA kernels of 8-bit AdamW (multi-tensor apply). The element arithmetic is
// adam_element_math.h, shared with the CPU reference, so results are bit-identical to it:
// this file is compiled without fast math, divisions and square roots are IEEE, and every
// multiply-add is an explicit fmaf there (docs/optimizer.md, "Bit-exactness").
//
// Blockwise kernel: one warp owns one 256-element quantization block, 8 consecutive elements
// per lane (vectorised 16-byte loads of param/grad and 8-byte loads of the codes where
// aligned), with the block's absmax reduced by warp shuffles. Eight warps per CTA share one
// copy of the two tables in shared memory and walk the blocks of all tensors grid-stride.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "sdtrain/optim/adamw8bit_kernels.h"
#include "sdtrain/util/cuda_convert.cuh"

namespace sdtrain::optim::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerCta = kThreads / 32;
constexpr int kElementsPerLane = kQuantizationBlockSize / 32;  // 8
static_assert(kElementsPerLane == 8, "vector loads below assume 8 elements per lane");

using ::sdtrain::cuda::from_float;
using ::sdtrain::cuda::to_float;

// The stored value of updated element `i`: to nearest, or for bf16 in lean mode
// stochastically with the element's bits (the CPU reference's rounded<T>, src/optim/adamw8bit.cpp).
template <typename T>
__device__ __forceinline__ T store_updated(float x, const AdamStepConstants&, int64_t) {
  return from_float<T>(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 store_updated<__nv_bfloat16>(
    float x, const AdamStepConstants& c, int64_t i) {
  if (c.stochastic_rounding == 0) return from_float<__nv_bfloat16>(x);
  __nv_bfloat16_raw raw;
  raw.x = bf16_bits_rounded_stochastically(x, rounding_bits(c.rounding_seed, i));
  return __nv_bfloat16(raw);
}

// Copies 8 consecutive elements: 16-byte vectors when aligned and complete, else one by one.
template <typename T>
__device__ __forceinline__ void load_lane(T (&out)[kElementsPerLane], const T* src, int count,
                                          bool vector) {
  if (vector) {
    constexpr int kVectors = kElementsPerLane * sizeof(T) / sizeof(uint4);
    const uint4* from = reinterpret_cast<const uint4*>(src);
    uint4* to = reinterpret_cast<uint4*>(out);
#pragma unroll
    for (int k = 0; k < kVectors; ++k) to[k] = from[k];
  } else {
#pragma unroll
    for (int j = 0; j < kElementsPerLane; ++j) {
      if (j < count) out[j] = src[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_lane(T* dst, const T (&in)[kElementsPerLane], int count,
                                           bool vector) {
  if (vector) {
    constexpr int kVectors = kElementsPerLane * sizeof(T) / sizeof(uint4);
    uint4* to = reinterpret_cast<uint4*>(dst);
    const uint4* from = reinterpret_cast<const uint4*>(in);
#pragma unroll
    for (int k = 0; k < kVectors; ++k) to[k] = from[k];
  } else {
#pragma unroll
    for (int j = 0; j < kElementsPerLane; ++j) {
      if (j < count) dst[j] = in[j];
    }
  }
}

__device__ __forceinline__ void load_codes(std::uint8_t (&out)[kElementsPerLane],
                                           const std::uint8_t* src, int count, bool vector) {
  if (vector) {
    *reinterpret_cast<uint2*>(out) = *reinterpret_cast<const uint2*>(src);
  } else {
#pragma unroll
    for (int j = 0; j < kElementsPerLane; ++j) out[j] = j < count ? src[j] : 0;
  }
}

__device__ __forceinline__ void store_codes(std::uint8_t* dst,
                                            const std::uint8_t (&in)[kElementsPerLane],
                                            int count, bool vector) {
  if (vector) {
    *reinterpret_cast<uint2*>(dst) = *reinterpret_cast<const uint2*>(in);
  } else {
#pragma unroll
    for (int j = 0; j < kElementsPerLane; ++j) {
      if (j < count) dst[j] = in[j];
    }
  }
}

// Index of the tensor owning `unit`: the last t with args[t].first_unit <= unit.
template <typename Args>
__device__ __forceinline__ int find_tensor(const Args* args, int num_tensors, int64_t unit) {
  int low = 0;
  int high = num_tensors - 1;
  while (low < high) {
    const int middle = (low + high + 1) / 2;
    if (args[middle].first_unit <= unit) {
      low = middle;
    } else {
      high = middle - 1;
    }
  }
  return low;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  }
  return x;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw8bit_blockwise_kernel(const QuantizedTensorArgs* args, int num_tensors,
                               int64_t total_units, const float* qmap_signed,
                               const float* qmap_unsigned) {
  __shared__ float table1[kQmapSize];
  __shared__ float table2[kQmapSize];
  for (int i = threadIdx.x; i < kQmapSize; i += kThreads) {
    table1[i] = qmap_signed[i];
    table2[i] = qmap_unsigned[i];
  }
  __syncthreads();

  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  // The whole warp iterates together, so the shuffles below always see all 32 lanes.
  for (int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarpsPerCta + warp; unit < total_units;
       unit += static_cast<int64_t>(gridDim.x) * kWarpsPerCta) {
    const QuantizedTensorArgs& a = args[find_tensor(args, num_tensors, unit)];
    // The same for every lane of the warp (one unit), so the shuffles below stay uniform.
    if (a.skip != nullptr && *a.skip != 0.0f) continue;
    const int64_t block = unit - a.first_unit;
    const int64_t begin = block * kQuantizationBlockSize + lane * kElementsPerLane;
    const int64_t remaining = a.numel - begin;  // may be <= 0 in a partial last block
    const int count = remaining <= 0 ? 0
                      : remaining >= kElementsPerLane ? kElementsPerLane
                                                      : static_cast<int>(remaining);
    const bool vector = a.vector_aligned != 0 && count == kElementsPerLane;
    const AdamStepConstants c = a.constants;

    T grad[kElementsPerLane];
    std::uint8_t code1[kElementsPerLane];
    std::uint8_t code2[kElementsPerLane];
    load_lane(grad, static_cast<const T*>(a.grad) + begin, count, vector);
    load_codes(code1, a.state1 + begin, count, vector);
    load_codes(code2, a.state2 + begin, count, vector);
    // Every lane reads the old scales before lane 0 overwrites them: the shuffles in
    // warp_max order these reads before that write.
    const float old_absmax1 = a.absmax1[block];
    const float old_absmax2 = a.absmax2[block];

    float m[kElementsPerLane];
    float v[kElementsPerLane];
    bool finite[kElementsPerLane];
    float max1 = 0.0f;
    float max2 = 0.0f;
#pragma unroll
    for (int j = 0; j < kElementsPerLane; ++j) {
      const float g = j < count ? to_float(grad[j]) : 0.0f;
      finite[j] = j < count && is_finite_value(g);
      m[j] = 0.0f;
      v[j] = 0.0f;
      if (finite[j]) {
        m[j] = dequantize(table1, code1[j], old_absmax1);
        v[j] = dequantize(table2, code2[j], old_absmax2);
        update_moments(g, m[j], v[j], c);
      }
      max1 = fmaxf(max1, fabsf(m[j]));
      max2 = fmaxf(max2, fabsf(v[j]));
    }
    const float new_absmax1 = warp_max(max1);
    const float new_absmax2 = warp_max(max2);
    if (lane == 0) {
      a.absmax1[block] = new_absmax1;
      a.absmax2[block] = new_absmax2;
    }
    if (count == 0) continue;

    T param[kElementsPerLane];
    T* param_ptr = static_cast<T*>(a.param) + begin;
    load_lane(param, param_ptr, count, vector);
#pragma unroll
    for (int j = 0; j < kElementsPerLane; ++j) {
      if (finite[j]) {
        param[j] = store_updated<T>(updated_parameter(to_float(param[j]), m[j], v[j], c), c,
                                    begin + j);
      }
      code1[j] = quantize_signed(table1, m[j], new_absmax1);
      code2[j] = quantize_unsigned(table2, v[j], new_absmax2);
    }
    store_lane(param_ptr, param, count, vector);
    store_codes(a.state1 + begin, code1, count, vector);
    store_codes(a.state2 + begin, code2, count, vector);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    adamw_fp32_states_kernel(const Fp32StateTensorArgs* args, int num_tensors,
                             int64_t total_units) {
  for (int64_t unit = blockIdx.x; unit < total_units; unit += gridDim.x) {
    const Fp32StateTensorArgs& a = args[find_tensor(args, num_tensors, unit)];
    if (a.skip != nullptr && *a.skip != 0.0f) continue;
    const AdamStepConstants c = a.constants;
    const int64_t chunk_begin = (unit - a.first_unit) * kFp32StateChunk;
    for (int k = threadIdx.x; k < kFp32StateChunk; k += kThreads) {
      const int64_t i = chunk_begin + k;  // consecutive threads, consecutive elements
      if (i >= a.numel) break;
      const float g = to_float(static_cast<const T*>(a.grad)[i]);
      if (!is_finite_value(g)) {
        a.exp_avg[i] = 0.0f;
        a.exp_avg_sq[i] = 0.0f;
        continue;
      }
      float m = a.exp_avg[i];
      float v = a.exp_avg_sq[i];
      update_moments(g, m, v, c);
      a.exp_avg[i] = m;
      a.exp_avg_sq[i] = v;
      T* param = static_cast<T*>(a.param) + i;
      *param = store_updated<T>(updated_parameter(to_float(*param), m, v, c), c, i);
    }
  }
}

// Enough CTAs to fill the device a few times over; the kernels are grid-stride.
int grid_size(int64_t ctas_wanted) {
  int device = 0;
  int sms = 80;
  if (cudaGetDevice(&device) == cudaSuccess) {
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  }
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(ctas_wanted, int64_t{sms} * 8)));
}

}  // namespace

cudaError_t launch_adamw8bit_blockwise(ElementType type, const QuantizedTensorArgs* args,
                                       int num_tensors, int64_t total_units,
                                       const float* qmap_signed, const float* qmap_unsigned,
                                       cudaStream_t stream) {
  if (num_tensors <= 0 || total_units <= 0) return cudaSuccess;  // an empty grid is an error
  const int grid = grid_size((total_units + kWarpsPerCta - 1) / kWarpsPerCta);
  switch (type) {
    case ElementType::float32:
      adamw8bit_blockwise_kernel<float><<<grid, kThreads, 0, stream>>>(
          args, num_tensors, total_units, qmap_signed, qmap_unsigned);
      break;
    case ElementType::float16:
      adamw8bit_blockwise_kernel<__half><<<grid, kThreads, 0, stream>>>(
          args, num_tensors, total_units, qmap_signed, qmap_unsigned);
      break;
    case ElementType::bfloat16:
      adamw8bit_blockwise_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          args, num_tensors, total_units, qmap_signed, qmap_unsigned);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

cudaError_t launch_adamw_fp32_states(ElementType type, const Fp32StateTensorArgs* args,
                                     int num_tensors, int64_t total_units, cudaStream_t stream) {
  if (num_tensors <= 0 || total_units <= 0) return cudaSuccess;
  const int grid = grid_size(total_units);
  switch (type) {
    case ElementType::float32:
      adamw_fp32_states_kernel<float><<<grid, kThreads, 0, stream>>>(args, num_tensors,
                                                                     total_units);
      break;
    case ElementType::float16:
      adamw_fp32_states_kernel<__half><<<grid, kThreads, 0, stream>>>(args, num_tensors,
                                                                      total_units);
      break;
    case ElementType::bfloat16:
      adamw_fp32_states_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(args, num_tensors,
                                                                             total_units);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace sdtrain::optim::cuda
