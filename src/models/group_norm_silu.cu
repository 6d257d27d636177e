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
// kernel merges them. Channels-last tensors take the kernels of src/models/group_norm_silu_nhwc.cu.

#include "group_norm_silu_device.cuh"

namespace sdtrain::models::cuda {
namespace {

// ---- the element arithmetic ----

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
      out[k] = activate(shape, z);
    }
    store_walked(y, i, out, count);
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
      const float d = activation_backward(shape, v[0][k], fmaf(v[1][k], scale, shift));
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
      const float dz = activation_backward(shape, v[0][k], fmaf(v[1][k], scale, shift));
      out[k] = fmaf(dz, scale, fmaf(cx, v[1][k], c1));
    }
    store_walked(dx, i, out, count);
  });
}

// ---- host side ----

Tiling group_tiling(const GroupNormShape& s, int element_bytes, const void* x) {
  return tiling(s.batch * s.groups, s.channels / s.groups * s.hw, s.multiprocessors,
                element_bytes, {x});
}

Tiling row_tiling(const GroupNormShape& s, int element_bytes,
                  std::initializer_list<const void*> pointers) {
  return tiling(s.batch * s.channels, s.hw, s.multiprocessors, element_bytes, pointers);
}

}  // namespace

int64_t group_norm_silu_forward_workspace(const GroupNormShape& shape) {
  if (shape.channels_last) return nhwc_forward_workspace(shape);
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
  if (shape.channels_last) {
    return launch_nhwc_forward(x_type, weight_type, shape, x, weight, bias, eps, workspace, mean,
                               rstd, y, stream);
  }
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
  if (shape.channels_last) return nhwc_backward_workspace(shape);
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
  if (shape.channels_last) {
    return launch_nhwc_backward(x_type, weight_type, shape, dy, x, weight, bias, mean, rstd,
                                workspace, dx, grad_weight, grad_bias, stream);
  }
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
