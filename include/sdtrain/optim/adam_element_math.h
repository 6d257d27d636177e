#pragma once
// The per-element arithmetic of (8-bit) AdamW, shared word for word by the CPU reference
// (src/optim/adamw8bit.cpp) and the CUDA kernels (src/optim/adamw8bit.cu), so both perform the
// same IEEE fp32 operations in the same order and round identically (docs/optimizer.md,
// "Bit-exactness"). No torch header here: nvcc compiles this file.
//
// Every multiply that feeds an add is written as an explicit fmaf, so neither the host
// compiler (-ffp-contract) nor nvcc (-fmad) can fuse a different subset of operations on one
// side only. Division and square root are IEEE (no fast math in either build).

#include <math.h>

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SDTRAIN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SDTRAIN_HOST_DEVICE inline
#endif

namespace sdtrain::optim {

// Elements per quantization block, each with one fp32 absmax per state (spec section 2.1).
inline constexpr int kQuantizationBlockSize = 256;
inline constexpr int kQmapSize = 256;

// fp32 constants of one parameter's step, computed once on the host in double precision and
// rounded once, so the CPU reference and the kernels consume identical values.
struct AdamStepConstants {
  float beta1 = 0.0f;
  float one_minus_beta1 = 0.0f;
  float beta2 = 0.0f;
  float one_minus_beta2 = 0.0f;
  float step_size = 0.0f;  // -lr * sqrt(1 - beta2^t) / (1 - beta1^t)
  float eps_hat = 0.0f;    // eps * sqrt(1 - beta2^t): eps added to sqrt(v_hat), as in torch
  float decay = 1.0f;      // 1 - lr * weight_decay
  // Lean mode (bf16 parameters): nonzero rounds each updated value stochastically with the
  // bits of rounding_bits(rounding_seed, element); otherwise to nearest, as a cast does.
  std::int32_t stochastic_rounding = 0;
  std::uint32_t rounding_seed = 0;
};

// MurmurHash3's 32-bit finaliser: a bijection whose every output bit depends on every input
// bit, cheap enough to run once per element on either side.
SDTRAIN_HOST_DEVICE std::uint32_t mix32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x85ebca6bu;
  x ^= x >> 13;
  x *= 0xc2b2ae35u;
  x ^= x >> 16;
  return x;
}

// The random bits of element `i` of a tensor in the step whose stream is `seed`. Counter-based
// (no generator state), so any thread on any device computes the same bits for the element.
SDTRAIN_HOST_DEVICE std::uint32_t rounding_bits(std::uint32_t seed, std::int64_t i) {
  const std::uint32_t low = static_cast<std::uint32_t>(i);
  const std::uint32_t high = static_cast<std::uint32_t>(static_cast<std::uint64_t>(i) >> 32);
  return mix32(seed ^ mix32(low ^ mix32(high + 0x9e3779b9u)));
}

// The bf16 bit pattern of `x` rounded stochastically: up with probability equal to the
// fraction of the gap below x, so E[round(x)] = x and updates smaller than half a bf16 ulp still
// move the weight on average (what round-to-nearest loses; docs/memory.md). The low 16 bits of
// `random` decide. inf stays inf; NaN stays a (quiet) NaN.
SDTRAIN_HOST_DEVICE std::uint16_t bf16_bits_rounded_stochastically(float x, std::uint32_t random) {
  std::uint32_t bits;
  memcpy(&bits, &x, sizeof(bits));
  if (x != x) return static_cast<std::uint16_t>((bits >> 16) | 0x0040u);
  if (fabsf(x) == INFINITY) return static_cast<std::uint16_t>(bits >> 16);
  return static_cast<std::uint16_t>((bits + (random & 0xffffu)) >> 16);
}

SDTRAIN_HOST_DEVICE bool is_finite_value(float x) { return x == x && fabsf(x) != INFINITY; }

SDTRAIN_HOST_DEVICE bool has_sign_bit(float x) { return copysignf(1.0f, x) < 0.0f; }

// m <- beta1 m + (1 - beta1) g ;  v <- beta2 v + (1 - beta2) g^2
SDTRAIN_HOST_DEVICE void update_moments(float g, float& m, float& v, const AdamStepConstants& c) {
  m = fmaf(m, c.beta1, c.one_minus_beta1 * g);
  v = fmaf(v, c.beta2, (c.one_minus_beta2 * g) * g);
}

// Decoupled weight decay first (torch.optim.AdamW order), then the Adam update, with a single
// rounding of the sum: p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps).
SDTRAIN_HOST_DEVICE float updated_parameter(float p, float m, float v, const AdamStepConstants& c) {
  const float denominator = sqrtf(v) + c.eps_hat;
  return fmaf(c.step_size, m / denominator, p * c.decay);
}

// Index into an ascending 256-entry table for x (spec section 2.5, closed form): k is the
// first entry >= x; x is compared with the fp32 midpoint of entries k-1 and k; a tie goes to
// the even index of the pair; below the first entry -> 0, above the last -> 255, NaN -> 0.
SDTRAIN_HOST_DEVICE int nearest_code(const float* table, float x) {
  if (!(x == x)) return 0;
  int k = 0;  // number of entries < x, by a fixed 8-step search (no data-dependent loop count)
  for (int step = 128; step > 0; step >>= 1) {
    if (table[k + step - 1] < x) k += step;
  }
  if (k == 255 && table[255] < x) return 255;
  if (k == 0) return 0;
  const float midpoint = (table[k - 1] + table[k]) * 0.5f;
  if (x < midpoint) return k - 1;
  if (x > midpoint) return k;
  return ((k - 1) % 2 == 0) ? k - 1 : k;
}

// First moment: nearest code of s / absmax in the signed table, then the sign fix (spec 2.5):
// a code whose sign differs from s moves one step towards s, so tiny negatives never decode to
// +0 and an all-zero block (0/0 = NaN -> 0, then 0 - 1) stores 255, as the reference does.
SDTRAIN_HOST_DEVICE std::uint8_t quantize_signed(const float* table, float s, float absmax) {
  int code = nearest_code(table, s / absmax);
  if (has_sign_bit(table[code]) != has_sign_bit(s)) code += (s > 0.0f) ? 1 : -1;
  return static_cast<std::uint8_t>(code & 0xff);
}

// Second moment: nearest code of s / absmax in the unsigned table, no sign fix.
SDTRAIN_HOST_DEVICE std::uint8_t quantize_unsigned(const float* table, float s, float absmax) {
  return static_cast<std::uint8_t>(nearest_code(table, s / absmax));
}

SDTRAIN_HOST_DEVICE float dequantize(const float* table, std::uint8_t code, float absmax) {
  return table[code] * absmax;
}

}  // namespace sdtrain::optim
