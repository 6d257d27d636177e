// CUDA kernels of the fused GroupNorm + SiLU for channels-last (NHWC) tensors: the formulas of
// src/models/group_norm_silu.cpp, as the NCHW kernels of src/models/group_norm_silu.cu compute
// them, for the layout channels-last convolutions read and write (cuDNN computes convolutions in
// NHWC on recent GPUs; fed NCHW it transposes in and out, docs/performance.md).
//
// In NHWC a pixel's channels are contiguous, and a group is a run of channels_per_group values
// in every pixel. The two reductions give each thread one channel and one "lane" of a tile of
// pixels (consecutive threads read consecutive channels, then the next pixel: coalesced), and
// write one partial per (sample, channel, tile, lane): a sub-tile. Listed channel by channel, a
// group's sub-tiles are contiguous, so one CTA per group merges its moments, and one warp per
// channel sums its backward partials before the per-group kernel both layouts share. The two
// element-wise kernels walk each sample's hw * channels elements in tiles, in 16-byte vectors
// where the channel count and alignment allow, each element taking its channel's scale and shift.

#include "group_norm_silu_device.cuh"

namespace sdtrain::models::cuda {
namespace {

constexpr int64_t kLeastPixelsPerTile = 8;  // so that each thread's pixel loop has some length
constexpr int64_t kMostSamples = 65535;     // gridDim.y's limit: the reductions' CTAs per sample

// Each sample's hw pixels cut into `tiles` tiles of `tile` pixels, the last one shorter.
struct PixelTiling {
  int64_t tiles;
  int64_t tile;
};

// Threads that share one channel of a tile, each taking every lanes-th pixel: with fewer
// channels than threads (the VAE's 128), the rest of the CTA would idle.
__host__ __device__ __forceinline__ int64_t pixel_lanes(int64_t channels) {
  return channels >= kThreads ? 1 : kThreads / channels;
}

PixelTiling pixel_tiling(const GroupNormShape& s) {
  const int64_t ctas = std::max<int64_t>(s.multiprocessors, 1) * kCtasPerMultiprocessor;
  const int64_t wanted = (ctas + s.batch - 1) / s.batch;
  const int64_t most = (s.hw + kLeastPixelsPerTile - 1) / kLeastPixelsPerTile;
  const int64_t tiles = std::clamp<int64_t>(std::min(wanted, most), 1, kMostTiles);
  PixelTiling t{tiles, (s.hw + tiles - 1) / tiles};
  t.tiles = (s.hw + t.tile - 1) / t.tile;  // no empty tile
  return t;
}

int64_t sub_tiles(const GroupNormShape& s, const PixelTiling& t) {
  return t.tiles * pixel_lanes(s.channels);
}

// The element-wise walk: each sample one segment of hw * channels elements. Vectors must not
// straddle two pixels, so they need the channel count to be whole vectors too.
Tiling element_tiling(const GroupNormShape& s, int element_bytes,
                      std::initializer_list<const void*> pointers) {
  Tiling t = tiling(s.batch, s.hw * s.channels, s.multiprocessors, element_bytes, pointers);
  t.vector = t.vector && s.channels % (16 / element_bytes) == 0;
  return t;
}

// z = x * scale + shift for channel c of sample n.
template <typename W>
__device__ __forceinline__ void channel_affine(const GroupNormShape& s, int64_t n, int c,
                                               const W* weight, const W* bias, const float* mean,
                                               const float* rstd, float& scale, float& shift) {
  const int64_t group = n * s.groups + c / static_cast<int>(s.channels / s.groups);
  scale = rstd[group] * to_float(weight[c]);
  shift = fmaf(-mean[group], scale, to_float(bias[c]));
}

// Calls visit(channel, sub_tile, first_pixel_offset, pixel_stride, end_offset) for each
// (channel, lane) slot of this CTA's tile (blockIdx.x) of sample blockIdx.y; offsets are
// element offsets into the sample.
template <typename Visit>
__device__ __forceinline__ void for_each_slot(const GroupNormShape& s, const PixelTiling& t,
                                              Visit&& visit) {
  const int64_t channels = s.channels, lanes = pixel_lanes(channels);
  const int64_t first = static_cast<int64_t>(blockIdx.x) * t.tile;
  const int64_t end = first + t.tile < s.hw ? first + t.tile : s.hw;
  for (int64_t slot = threadIdx.x; slot < channels * lanes; slot += kThreads) {
    const int64_t c = slot % channels, lane = slot / channels;
    const int64_t sub_tile = static_cast<int64_t>(blockIdx.x) * lanes + lane;
    visit(c, sub_tile, (first + lane) * channels + c, lanes * channels, end * channels);
  }
}

// ---- forward ----

// Moments of one channel over one sub-tile's pixels, to partial[(n * C + c) * sub_tiles + k]
// as 3 floats. Sums of deviations from the sub-tile's first value: no division per element,
// and stable where the mean is large against the spread (Chan et al.'s shifted data).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    channel_moments_kernel(GroupNormShape s, PixelTiling t, const T* x, float* partial) {
  const int64_t n = blockIdx.y, sub_tiles = t.tiles * pixel_lanes(s.channels);
  const T* sample = x + n * s.hw * s.channels;
  for_each_slot(s, t, [&](int64_t c, int64_t sub_tile, int64_t i, int64_t stride, int64_t end) {
    const float shift = i < end ? to_float(sample[i]) : 0.0f;
    float count = 0.0f, sum = 0.0f, sum_sq = 0.0f;
    for (; i < end; i += stride) {
      const float d = to_float(sample[i]) - shift;
      count += 1.0f;
      sum += d;
      sum_sq = fmaf(d, d, sum_sq);
    }
    const float mean = count > 0.0f ? sum / count : 0.0f;
    float* out = partial + 3 * ((n * s.channels + c) * sub_tiles + sub_tile);
    out[0] = count;
    out[1] = shift + mean;
    out[2] = fmaxf(fmaf(-sum, mean, sum_sq), 0.0f);
  });
}

// One CTA per group (blockIdx.x = n * groups + g): its sub-tiles' moments merged into mean and
// rstd.
__global__ void __launch_bounds__(kThreads)
    group_moments_kernel(int64_t partials_per_group, const float* partial, float eps, float* mean,
                         float* rstd) {
  const float* p = partial + 3 * static_cast<int64_t>(blockIdx.x) * partials_per_group;
  Moments m{0.0f, 0.0f, 0.0f};
  for (int64_t k = threadIdx.x; k < partials_per_group; k += kThreads) {
    m = merge(m, Moments{p[3 * k], p[3 * k + 1], p[3 * k + 2]});
  }
  m = block_merge(m);
  if (threadIdx.x == 0) {
    mean[blockIdx.x] = m.mean;
    rstd[blockIdx.x] = rsqrtf(fmaxf(m.m2 / m.count, 0.0f) + eps);  // biased, as torch's
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    nhwc_apply_kernel(GroupNormShape s, Tiling t, const T* x, const W* weight, const W* bias,
                      const float* mean, const float* rstd, T* y) {
  const int64_t n = blockIdx.x, sample_start = n * t.length;
  const T* const arrays[1] = {x};
  walk_tile(t, arrays, [&](int64_t i, const float (&v)[1][kVector<T>], int count) {
    const int first_channel = static_cast<int>((i - sample_start) % s.channels);
    float out[kVector<T>];
    for (int k = 0; k < count; ++k) {
      float scale, shift;
      channel_affine(s, n, first_channel + k, weight, bias, mean, rstd, scale, shift);
      const float z = fmaf(v[0][k], scale, shift);
      out[k] = activate(s, z);
    }
    store_walked(y, i, out, count);
  });
}

// ---- backward ----

// Sums of dz * x and of dz of one channel over one sub-tile, to
// partial_dz_x / partial_dz[(n * C + c) * sub_tiles + k].
template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    channel_sums_kernel(GroupNormShape s, PixelTiling t, const T* dy, const T* x, const W* weight,
                        const W* bias, const float* mean, const float* rstd, float* partial_dz_x,
                        float* partial_dz) {
  const int64_t n = blockIdx.y, sub_tiles = t.tiles * pixel_lanes(s.channels);
  const int64_t sample_start = n * s.hw * s.channels;
  for_each_slot(s, t, [&](int64_t c, int64_t sub_tile, int64_t i, int64_t stride, int64_t end) {
    float scale, shift;
    channel_affine(s, n, static_cast<int>(c), weight, bias, mean, rstd, scale, shift);
    float dz_x = 0.0f, dz = 0.0f;
    for (; i < end; i += stride) {
      const float xv = to_float(x[sample_start + i]);
      const float d =
          activation_backward(s, to_float(dy[sample_start + i]), fmaf(xv, scale, shift));
      dz_x = fmaf(d, xv, dz_x);
      dz += d;
    }
    const int64_t at = (n * s.channels + c) * sub_tiles + sub_tile;
    partial_dz_x[at] = dz_x;
    partial_dz[at] = dz;
  });
}

// One warp per row (n * C + c): the totals of its sub-tiles, for group_coefficients_kernel.
__global__ void __launch_bounds__(kThreads)
    row_totals_kernel(int64_t rows, int64_t sub_tiles, const float* partial_dz_x,
                      const float* partial_dz, float* total_dz_x, float* total_dz) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= rows) return;  // the whole warp: row is the same for its 32 threads
  const int lane = threadIdx.x % 32;
  float a = 0.0f, b = 0.0f;
  for (int64_t k = lane; k < sub_tiles; k += 32) {
    a += partial_dz_x[row * sub_tiles + k];
    b += partial_dz[row * sub_tiles + k];
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    a += __shfl_down_sync(kFullMask, a, offset);
    b += __shfl_down_sync(kFullMask, b, offset);
  }
  if (lane == 0) {
    total_dz_x[row] = a;
    total_dz[row] = b;
  }
}

template <typename T, typename W>
__global__ void __launch_bounds__(kThreads)
    nhwc_input_grad_kernel(GroupNormShape s, Tiling t, const T* dy, const T* x, const W* weight,
                           const W* bias, const float* mean, const float* rstd,
                           const float* coefficient_x, const float* coefficient_1, T* dx) {
  const int64_t n = blockIdx.x, sample_start = n * t.length;
  const int per_group = static_cast<int>(s.channels / s.groups);
  const T* const arrays[2] = {dy, x};
  walk_tile(t, arrays, [&](int64_t i, const float (&v)[2][kVector<T>], int count) {
    const int first_channel = static_cast<int>((i - sample_start) % s.channels);
    float out[kVector<T>];
    for (int k = 0; k < count; ++k) {
      const int c = first_channel + k;
      float scale, shift;
      channel_affine(s, n, c, weight, bias, mean, rstd, scale, shift);
      const int64_t group = n * s.groups + c / per_group;
      const float dz = activation_backward(s, v[0][k], fmaf(v[1][k], scale, shift));
      out[k] = fmaf(dz, scale, fmaf(coefficient_x[group], v[1][k], coefficient_1[group]));
    }
    store_walked(dx, i, out, count);
  });
}

dim3 reduction_grid(const GroupNormShape& s, const PixelTiling& t) {
  return dim3(static_cast<unsigned>(t.tiles), static_cast<unsigned>(s.batch));
}

}  // namespace

int64_t nhwc_forward_workspace(const GroupNormShape& shape) {
  return 3 * shape.batch * shape.channels * sub_tiles(shape, pixel_tiling(shape));
}

int64_t nhwc_backward_workspace(const GroupNormShape& shape) {
  const int64_t rows = shape.batch * shape.channels;
  return 2 * rows * sub_tiles(shape, pixel_tiling(shape)) + 2 * rows + 2 * shape.batch * shape.groups;
}

cudaError_t launch_nhwc_forward(ElementType x_type, ElementType weight_type,
                                const GroupNormShape& shape, const void* x, const void* weight,
                                const void* bias, float eps, float* workspace, float* mean,
                                float* rstd, void* y, cudaStream_t stream) {
  if (shape.batch > kMostSamples) return cudaErrorInvalidValue;
  const PixelTiling pixels = pixel_tiling(shape);
  const int64_t per_group = shape.channels / shape.groups * sub_tiles(shape, pixels);
  const Tiling elements = element_tiling(shape, element_bytes(x_type), {x, y});
  return with_types(x_type, weight_type, [&](auto x_tag, auto weight_tag) {
    using T = decltype(x_tag);
    using W = decltype(weight_tag);
    channel_moments_kernel<T><<<reduction_grid(shape, pixels), kThreads, 0, stream>>>(
        shape, pixels, static_cast<const T*>(x), workspace);
    group_moments_kernel<<<static_cast<unsigned>(shape.batch * shape.groups), kThreads, 0,
                           stream>>>(per_group, workspace, eps, mean, rstd);
    nhwc_apply_kernel<T, W><<<grid_of(elements), kThreads, 0, stream>>>(
        shape, elements, static_cast<const T*>(x), static_cast<const W*>(weight),
        static_cast<const W*>(bias), mean, rstd, static_cast<T*>(y));
    return cudaGetLastError();
  });
}

cudaError_t launch_nhwc_backward(ElementType x_type, ElementType weight_type,
                                 const GroupNormShape& shape, const void* dy, const void* x,
                                 const void* weight, const void* bias, const float* mean,
                                 const float* rstd, float* workspace, void* dx, void* grad_weight,
                                 void* grad_bias, cudaStream_t stream) {
  if (shape.batch > kMostSamples) return cudaErrorInvalidValue;
  const PixelTiling pixels = pixel_tiling(shape);
  const int64_t rows = shape.batch * shape.channels, subs = sub_tiles(shape, pixels);
  const Tiling elements = element_tiling(shape, element_bytes(x_type), {dy, x, dx});
  float* partial_dz_x = workspace;
  float* partial_dz = partial_dz_x + rows * subs;
  float* total_dz_x = partial_dz + rows * subs;
  float* total_dz = total_dz_x + rows;
  float* coefficient_x = total_dz + rows;
  float* coefficient_1 = coefficient_x + shape.batch * shape.groups;
  return with_types(x_type, weight_type, [&](auto x_tag, auto weight_tag) {
    using T = decltype(x_tag);
    using W = decltype(weight_tag);
    const auto* dy_t = static_cast<const T*>(dy);
    const auto* x_t = static_cast<const T*>(x);
    const auto* weight_w = static_cast<const W*>(weight);
    const auto* bias_w = static_cast<const W*>(bias);
    channel_sums_kernel<T, W><<<reduction_grid(shape, pixels), kThreads, 0, stream>>>(
        shape, pixels, dy_t, x_t, weight_w, bias_w, mean, rstd, partial_dz_x, partial_dz);
    row_totals_kernel<<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0,
                        stream>>>(rows, subs, partial_dz_x, partial_dz, total_dz_x, total_dz);
    const int64_t threads = std::max(shape.batch * shape.groups, shape.channels);
    // The totals are each row's only "tile".
    group_coefficients_kernel<W><<<(threads + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        shape, 1, total_dz_x, total_dz, weight_w, mean, rstd, coefficient_x, coefficient_1,
        static_cast<W*>(grad_weight), static_cast<W*>(grad_bias));
    nhwc_input_grad_kernel<T, W><<<grid_of(elements), kThreads, 0, stream>>>(
        shape, elements, dy_t, x_t, weight_w, bias_w, mean, rstd, coefficient_x, coefficient_1,
        static_cast<T*>(dx));
    return cudaGetLastError();
  });
}

}  // namespace sdtrain::models::cuda
