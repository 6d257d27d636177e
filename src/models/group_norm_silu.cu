// CUDA kernels of the fused GroupNorm + SiLU (include/sdtrain/models/group_norm_silu_kernels.h).
// The formulas are those of the CPU reference in src/models/group_norm_silu.cpp, which says where
// they come from; the GPU test compares the two. All arithmetic is fp32, whatever the storage.
//
// In NCHW one group of one sample is a contiguous run of channels_per_group * hw elements, and
// one channel of one sample ("a row") a run of hw elements. Every kernel but the two small
// per-group ones walks such runs ("segments": groups for the moments, rows for the rest), each
// cut into tiles so that the grid fills the GPU several times over: SD's VAE at 512x512 has
// rows of 262,144 elements and only 128 of them, and one CTA per row (as ATen's moments kernel
// has one per group) would leave most multiprocessors idle. A CTA owns one tile (blockIdx.x the
// segment, blockIdx.y the tile) and reads it in 16-byte vectors where the layout allows, so
// each thread has several loads in flight. The reductions write one partial per tile; a small
// kernel merges them.

#include <algorithm>

#include "sdtrain/models/group_norm_silu_kernels.h"
#include "sdtrain/util/cuda_convert.cuh"

namespace sdtrain::models::cuda {
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

// ---- the element arithmetic ----

__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// d silu(z) / dz = s (1 + z (1 - s)) with s = sigmoid(z), times the incoming gradient.
__device__ __forceinline__ float silu_backward(float dy, float z) {
  const float s = sigmoid(z);
  return dy * s * fmaf(z, 1.0f - s, 1.0f);
}

// The normalisation of one row (sample * channels + channel) as z = x * scale + shift.
template <typename W>
__device__ __forceinline__ void row_affine(const GroupNormShape& s, int64_t row, const W* weight,
                                           const W* bias, const float* mean, const float* rstd,
                                           float& scale, float& shift) {
  const int64_t channel = row % s.channels;
  const int64_t group = row / (s.channels / s.groups);
  scale = rstd[group] * to_float(weight[channel]);
  shift = fmaf(-mean[group], scale, to_float(bias[channel]));
}

// ---- forward ----

// One tile of a group: its moments, to partial[group * tiles + tile] as 3 floats.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    tile_moments_kernel(Tiling t, const T* x, float* partial) {
  Moments m{0.0f, 0.0f, 0.0f};
  const T* const arrays[1] = {x};
  walk_tile(t, arrays, [&](int64_t, const float (&v)[1][kVector<T>], int count) {
    // The vector's own moments, then one merge: one division per vector.
    float sum = 0.0f;
    for (int k = 0; k < count; ++k) sum += v[0][k];
    const float mean = sum / static_cast<float>(count);
    float m2 = 0.0f;
    for (int k = 0; k < count; ++k) m2 = fmaf(v[0][k] - mean, v[0][k] - mean, m2);
    m = merge(m, Moments{static_cast<float>(count), mean, m2});
  });
  m = block_merge(m);
  if (threadIdx.x == 0) {
    float* out = partial + 3 * (static_cast<int64_t>(blockIdx.x) * t.tiles + blockIdx.y);
    out[0] = m.count;
    out[1] = m.mean;
    out[2] = m.m2;
  }
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

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    apply_kernel(GroupNormShape shape, Tiling t, const T* x, const W* weight, const W* bias,
                 const float* mean, const float* rstd, T* y) {
  float scale, shift;
  row_affine(shape, blockIdx.x, weight, bias, mean, rstd, scale, shift);
  const T* const arrays[1] = {x};
  walk_tile(t, arrays, [&](int64_t i, const float (&v)[1][kVector<T>], int count) {
    float out[kVector<T>];
    for (int k = 0; k < count; ++k) {
      const float z = fmaf(v[0][k], scale, shift);
      out[k] = z * sigmoid(z);
    }
    if (count == kVector<T>) {
      store_vector(y + i, out);
    } else {
      y[i] = from_float<T>(out[0]);
    }
  });
}

// ---- backward ----

// One tile of a row: the sums of dz * x and of dz, where dz is the gradient at the normalised
// value, to partial_dz_x / partial_dz[row * tiles + tile].
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    tile_sums_kernel(GroupNormShape shape, Tiling t, const T* dy, const T* x, const W* weight,
                     const W* bias, const float* mean, const float* rstd, float* partial_dz_x,
                     float* partial_dz) {
  float scale, shift;
  row_affine(shape, blockIdx.x, weight, bias, mean, rstd, scale, shift);
  float dz_x = 0.0f, dz = 0.0f;
  const T* const arrays[2] = {dy, x};
  walk_tile(t, arrays, [&](int64_t, const float (&v)[2][kVector<T>], int count) {
    for (int k = 0; k < count; ++k) {
      const float d = silu_backward(v[0][k], fmaf(v[1][k], scale, shift));
      dz_x = fmaf(d, v[1][k], dz_x);
      dz += d;
    }
  });
  block_sum(dz_x, dz);
  if (threadIdx.x == 0) {
    const int64_t at = static_cast<int64_t>(blockIdx.x) * t.tiles + blockIdx.y;
    partial_dz_x[at] = dz_x;
    partial_dz[at] = dz;
  }
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

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    input_grad_kernel(GroupNormShape shape, Tiling t, const T* dy, const T* x, const W* weight,
                      const W* bias, const float* mean, const float* rstd,
                      const float* coefficient_x, const float* coefficient_1, T* dx) {
  float scale, shift;
  row_affine(shape, blockIdx.x, weight, bias, mean, rstd, scale, shift);
  const int64_t group = blockIdx.x / (shape.channels / shape.groups);
  const float cx = coefficient_x[group], c1 = coefficient_1[group];
  const T* const arrays[2] = {dy, x};
  walk_tile(t, arrays, [&](int64_t i, const float (&v)[2][kVector<T>], int count) {
    float out[kVector<T>];
    for (int k = 0; k < count; ++k) {
      const float dz = silu_backward(v[0][k], fmaf(v[1][k], scale, shift));
      out[k] = fmaf(dz, scale, fmaf(cx, v[1][k], c1));
    }
    if (count == kVector<T>) {
      store_vector(dx + i, out);
    } else {
      dx[i] = from_float<T>(out[0]);
    }
  });
}

// ---- host side ----

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

Tiling group_tiling(const GroupNormShape& s, int element_bytes, const void* x) {
  return tiling(s.batch * s.groups, s.channels / s.groups * s.hw, s.multiprocessors,
                element_bytes, {x});
}

Tiling row_tiling(const GroupNormShape& s, int element_bytes,
                  std::initializer_list<const void*> pointers) {
  return tiling(s.batch * s.channels, s.hw, s.multiprocessors, element_bytes, pointers);
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

int64_t group_norm_silu_forward_workspace(const GroupNormShape& shape) {
  // The most tiles any element size gives: 2-byte elements have the longer vectors, so fewer.
  const Tiling t = group_tiling(shape, 4, nullptr);
  return 3 * t.segments * t.tiles;
}

cudaError_t launch_group_norm_silu_forward(ElementType x_type, ElementType weight_type,
                                           const GroupNormShape& shape, const void* x,
                                           const void* weight, const void* bias, float eps,
                                           float* workspace, float* mean, float* rstd, void* y,
                                           cudaStream_t stream) {
  if (empty(shape)) return cudaSuccess;
  const int bytes = element_bytes(x_type);
  const Tiling groups = group_tiling(shape, bytes, x);
  const Tiling rows = row_tiling(shape, bytes, {x, y});
  return with_types(x_type, weight_type, [&](auto x_tag, auto weight_tag) {
    using T = decltype(x_tag);
    using W = decltype(weight_tag);
    tile_moments_kernel<T><<<grid_of(groups), kThreads, 0, stream>>>(
        groups, static_cast<const T*>(x), workspace);
    merge_moments_kernel<<<(groups.segments + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        groups.segments, groups.tiles, workspace, eps, mean, rstd);
    apply_kernel<T, W><<<grid_of(rows), kThreads, 0, stream>>>(
        shape, rows, static_cast<const T*>(x), static_cast<const W*>(weight),
        static_cast<const W*>(bias), mean, rstd, static_cast<T*>(y));
    return cudaGetLastError();
  });
}

int64_t group_norm_silu_backward_workspace(const GroupNormShape& shape) {
  const Tiling t = row_tiling(shape, 4, {});
  return 2 * t.segments * t.tiles + 2 * shape.batch * shape.groups;
}

cudaError_t launch_group_norm_silu_backward(ElementType x_type, ElementType weight_type,
                                            const GroupNormShape& shape, const void* dy,
                                            const void* x, const void* weight, const void* bias,
                                            const float* mean, const float* rstd,
                                            float* workspace, void* dx, void* grad_weight,
                                            void* grad_bias, cudaStream_t stream) {
  if (empty(shape)) return cudaSuccess;
  const Tiling rows = row_tiling(shape, element_bytes(x_type), {dy, x, dx});
  float* partial_dz_x = workspace;
  float* partial_dz = partial_dz_x + rows.segments * rows.tiles;
  float* coefficient_x = partial_dz + rows.segments * rows.tiles;
  float* coefficient_1 = coefficient_x + shape.batch * shape.groups;
  return with_types(x_type, weight_type, [&](auto x_tag, auto weight_tag) {
    using T = decltype(x_tag);
    using W = decltype(weight_tag);
    const auto* dy_t = static_cast<const T*>(dy);
    const auto* x_t = static_cast<const T*>(x);
    const auto* weight_w = static_cast<const W*>(weight);
    const auto* bias_w = static_cast<const W*>(bias);
    tile_sums_kernel<T, W><<<grid_of(rows), kThreads, 0, stream>>>(
        shape, rows, dy_t, x_t, weight_w, bias_w, mean, rstd, partial_dz_x, partial_dz);
    const int64_t threads = std::max(shape.batch * shape.groups, shape.channels);
    group_coefficients_kernel<W><<<(threads + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        shape, rows.tiles, partial_dz_x, partial_dz, weight_w, mean, rstd, coefficient_x,
        coefficient_1, static_cast<W*>(grad_weight), static_cast<W*>(grad_bias));
    input_grad_kernel<T, W><<<grid_of(rows), kThreads, 0, stream>>>(
        shape, rows, dy_t, x_t, weight_w, bias_w, mean, rstd, coefficient_x, coefficient_1,
        static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

}  // namespace sdtrain::models::cuda
