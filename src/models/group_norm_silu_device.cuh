#pragma once
// What the NCHW kernels (src/models/group_norm_silu.cu) and the channels-last ones
// (src/models/group_norm_silu_nhwc.cu) share: the tiling, vector loads and stores, the
// reductions, SiLU's derivative, the two small per-group kernels both layouts end in, and the
// dispatch on the storage types. Private to those two files: everything but the channels-last
// launchers has internal linkage, so each file has its own copy.

#include <algorithm>
#include <initializer_list>

#include "sdtrain/models/group_norm_silu_kernels.h"
#include "sdtrain/util/cuda_convert.cuh"

namespace sdtrain::models::cuda {

// The channels-last launchers (src/models/group_norm_silu_nhwc.cu), which the entry points in
// src/models/group_norm_silu.cu call for a shape with channels_last set.
int64_t nhwc_forward_workspace(const GroupNormShape& shape);
int64_t nhwc_backward_workspace(const GroupNormShape& shape);
cudaError_t launch_nhwc_forward(ElementType x_type, ElementType weight_type,
                                const GroupNormShape& shape, const void* x, const void* weight,
                                const void* bias, float eps, float* workspace, float* mean,
                                float* rstd, void* y, cudaStream_t stream);
cudaError_t launch_nhwc_backward(ElementType x_type, ElementType weight_type,
                                 const GroupNormShape& shape, const void* dy, const void* x,
                                 const void* weight, const void* bias, const float* mean,
                                 const float* rstd, float* workspace, void* dx, void* grad_weight,
                                 void* grad_bias, cudaStream_t stream);

namespace {

using ::sdtrain::cuda::from_float;
using ::sdtrain::cuda::to_float;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCtasPerMultiprocessor = 4;  // the grid each walk aims for
constexpr int64_t kMostTiles = 65535;      // gridDim.y's limit

// Elements per 16-byte vector: 4 of fp32, 8 of fp16 or bf16.
template <typename T>
constexpr int kVector = 16 / sizeof(T);

// How segments of `length` elements are cut: `tiles` tiles of `tile` elements (a multiple of
// the vector), the last one shorter. `vector`: every tile starts 16-byte aligned and holds
// whole vectors.
struct Tiling {
  int64_t segments;
  int64_t length;
  int64_t tiles;
  int64_t tile;
  bool vector;
};

// ---- element loads and stores ----

template <typename T>
__device__ __forceinline__ void load_vector(const T* p, float (&out)[kVector<T>]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* elements = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVector<T>; ++k) out[k] = to_float(elements[k]);
}

template <typename T>
__device__ __forceinline__ void store_vector(T* p, const float (&in)[kVector<T>]) {
  uint4 raw;
  T* elements = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVector<T>; ++k) elements[k] = from_float<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Stores what a visit of walk_tile computed for its `count` elements from index i: a whole
// vector, or one element.
template <typename T>
__device__ __forceinline__ void store_walked(T* p, int64_t i, const float (&values)[kVector<T>],
                                             int count) {
  if (count == kVector<T>) {
    store_vector(p + i, values);
  } else {
    p[i] = from_float<T>(values[0]);
  }
}

// Calls visit(first_index, values, count) for this thread's share of its CTA's tile, in
// vectors of kVector<T> where the tiling allows, else one element at a time. `values` holds
// the loaded elements of each array in `arrays` (x, or dy and x).
template <typename T, int kArrays, typename Visit>
__device__ __forceinline__ void walk_tile(const Tiling& t, const T* const (&arrays)[kArrays],
                                          Visit&& visit) {
  const int64_t start = static_cast<int64_t>(blockIdx.x) * t.length;
  const int64_t begin = start + static_cast<int64_t>(blockIdx.y) * t.tile;
  const int64_t tile_end = (static_cast<int64_t>(blockIdx.y) + 1) * t.tile;
  const int64_t end = start + (tile_end < t.length ? tile_end : t.length);
  constexpr int V = kVector<T>;
  if (t.vector) {
    for (int64_t i = begin + threadIdx.x * V; i < end; i += int64_t{kThreads} * V) {
      float values[kArrays][V];
#pragma unroll
      for (int a = 0; a < kArrays; ++a) load_vector(arrays[a] + i, values[a]);
      visit(i, values, V);
    }
  } else {
    for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
      float values[kArrays][V];
#pragma unroll
      for (int a = 0; a < kArrays; ++a) values[a][0] = to_float(arrays[a][i]);
      visit(i, values, 1);
    }
  }
}

// ---- reductions ----

// Count, mean and sum of squared deviations of a set of values (Welford), merged pairwise by
// Chan et al.'s formula: stable where the mean is large against the deviation, which summing
// x and x^2 is not.
struct Moments {
  float count;
  float mean;
  float m2;
};

__device__ __forceinline__ Moments merge(const Moments& a, const Moments& b) {
  const float count = a.count + b.count;
  if (count == 0.0f) return a;
  const float delta = b.mean - a.mean;
  const float b_share = b.count / count;
  return {count, fmaf(delta, b_share, a.mean), a.m2 + b.m2 + delta * delta * a.count * b_share};
}

__device__ __forceinline__ Moments warp_merge(Moments m) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    const Moments other{__shfl_down_sync(kFullMask, m.count, offset),
                        __shfl_down_sync(kFullMask, m.mean, offset),
                        __shfl_down_sync(kFullMask, m.m2, offset)};
    m = merge(m, other);
  }
  return m;
}

// The CTA's merged moments, valid in thread 0.
__device__ Moments block_merge(Moments m) {
  __shared__ Moments partial[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  m = warp_merge(m);
  if (lane == 0) partial[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? partial[lane] : Moments{0.0f, 0.0f, 0.0f};
    m = warp_merge(m);
  }
  return m;
}

// The CTA's sums of a and of b, valid in thread 0.
__device__ void block_sum(float& a, float& b) {
  __shared__ float partial[2][kWarps];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  if (lane == 0) {
    partial[0][warp] = a;
    partial[1][warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kWarps ? partial[0][lane] : 0.0f;
    b = lane < kWarps ? partial[1][lane] : 0.0f;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      a += __shfl_down_sync(kFullMask, a, offset);
      b += __shfl_down_sync(kFullMask, b, offset);
    }
  }
}

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// d silu(z) / dz = s (1 + z (1 - s)) with s = sigmoid(z), times the incoming gradient.
__device__ __forceinline__ float silu_backward(float dy, float z) {
  const float s = sigmoid(z);
  return dy * s * fmaf(z, 1.0f - s, 1.0f);
}

// The output at the normalised value z: silu(z), or z itself for a GroupNorm alone (the shape's
// `silu`, the same for every thread of a launch, so the branch never diverges).
__device__ __forceinline__ float activate(const GroupNormShape& s, float z) {
  return s.silu ? z * sigmoid(z) : z;
}

// The gradient at z from the output's gradient dy.
__device__ __forceinline__ float activation_backward(const GroupNormShape& s, float dy, float z) {
  return s.silu ? silu_backward(dy, z) : dy;
}

// One thread per group: merges its tiles' moments into mean and rstd.
__global__ void __launch_bounds__(kThreads)
    merge_moments_kernel(int64_t groups, int64_t tiles, const float* partial, float eps,
                         float* mean, float* rstd) {
  const int64_t group = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (group >= groups) return;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int64_t k = 0; k < tiles; ++k) {
    const float* p = partial + 3 * (group * tiles + k);
    m = merge(m, Moments{p[0], p[1], p[2]});
  }
  mean[group] = m.mean;
  // The biased variance, as torch's group_norm.
  rstd[group] = rsqrtf(fmaxf(m.m2 / m.count, 0.0f) + eps);
}

__device__ __forceinline__ float row_total(const float* partial, int64_t row, int64_t tiles) {
  float total = 0.0f;
  for (int64_t k = 0; k < tiles; ++k) total += partial[row * tiles + k];
  return total;
}

// Threads below batch * groups: the group's coefficients of dx = dz * scale + cx * x + c1.
// Threads below channels (when grad_weight is wanted): the affine gradients of that channel.
template <typename W>
__global__ void __launch_bounds__(kThreads)
    group_coefficients_kernel(GroupNormShape shape, int64_t tiles, const float* partial_dz_x,
                              const float* partial_dz, const W* weight, const float* mean,
                              const float* rstd, float* coefficient_x, float* coefficient_1,
                              W* grad_weight, W* grad_bias) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t per_group = shape.channels / shape.groups;
  if (i < shape.batch * shape.groups) {
    const int64_t first_channel = (i % shape.groups) * per_group;
    const int64_t first_row = (i / shape.groups) * shape.channels + first_channel;
    float sum1 = 0.0f, sum2 = 0.0f;
    for (int64_t k = 0; k < per_group; ++k) {
      const float w = to_float(weight[first_channel + k]);
      sum1 = fmaf(row_total(partial_dz_x, first_row + k, tiles), w, sum1);
      sum2 = fmaf(row_total(partial_dz, first_row + k, tiles), w, sum2);
    }
    const float r = rstd[i], mu = mean[i];
    const float inverse_count = 1.0f / static_cast<float>(per_group * shape.hw);
    const float cx = (sum2 * mu - sum1) * r * r * r * inverse_count;
    coefficient_x[i] = cx;
    coefficient_1[i] = -cx * mu - sum2 * r * inverse_count;
  }
  if (grad_weight != nullptr && i < shape.channels) {
    float dw = 0.0f, db = 0.0f;
    for (int64_t n = 0; n < shape.batch; ++n) {
      const int64_t row = n * shape.channels + i;
      const int64_t group = n * shape.groups + i / per_group;
      const float ds = row_total(partial_dz_x, row, tiles);
      const float dsum = row_total(partial_dz, row, tiles);
      dw = fmaf(fmaf(-mean[group], dsum, ds), rstd[group], dw);
      db += dsum;
    }
    grad_weight[i] = from_float<W>(dw);
    grad_bias[i] = from_float<W>(db);
  }
}

// Tiles per segment: enough for kCtasPerMultiprocessor CTAs per multiprocessor in all, but at
// least one vector per thread in each. `element_bytes` and the pointers decide `vector`.
Tiling tiling(int64_t segments, int64_t length, int64_t multiprocessors, int element_bytes,
              std::initializer_list<const void*> pointers) {
  const int64_t vector = 16 / element_bytes;
  Tiling t{segments, length, 1, length, length % vector == 0};
  for (const void* p : pointers) t.vector = t.vector && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  if (segments == 0 || length == 0) return t;
  const int64_t ctas = std::max<int64_t>(multiprocessors, 1) * kCtasPerMultiprocessor;
  const int64_t wanted = (ctas + segments - 1) / segments;
  const int64_t most = (length + kThreads * vector - 1) / (kThreads * vector);
  const int64_t tiles = std::clamp<int64_t>(std::min(wanted, most), 1, kMostTiles);
  t.tile = ((length + tiles - 1) / tiles + vector - 1) / vector * vector;
  t.tiles = (length + t.tile - 1) / t.tile;  // no empty tile
  return t;
}

dim3 grid_of(const Tiling& t) {
  return dim3(static_cast<unsigned>(t.segments), static_cast<unsigned>(t.tiles));
}

int element_bytes(ElementType type) { return type == ElementType::float32 ? 4 : 2; }

// Calls launch(T{}, W{}) for the storage types: activations T, weight and bias W, where W is
// float or T. Other pairs are refused (the torch side casts the weight to float first).
template <typename Launch>
cudaError_t with_types(ElementType x_type, ElementType weight_type, Launch&& launch) {
  const bool float_weight = weight_type == ElementType::float32;
  switch (x_type) {
    case ElementType::float32:
      if (float_weight) return launch(float{}, float{});
      break;
    case ElementType::float16:
      if (float_weight) return launch(__half{}, float{});
      if (weight_type == x_type) return launch(__half{}, __half{});
      break;
    case ElementType::bfloat16:
      if (float_weight) return launch(__nv_bfloat16{}, float{});
      if (weight_type == x_type) return launch(__nv_bfloat16{}, __nv_bfloat16{});
      break;
  }
  return cudaErrorInvalidValue;
}

bool empty(const GroupNormShape& s) { return s.batch * s.channels * s.hw == 0; }

}  // namespace
}  // namespace sdtrain::models::cuda
