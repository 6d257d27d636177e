// The frozen tables and the quantization rules of docs/optimizer.md / spec sections 1-2.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "sdtrain/optim/blockwise_quantization.h"

namespace sdtrain::optim {
namespace {

uint32_t bits_of(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

// Spec 1.2 in exact arithmetic: per decade i = 0..6, N_i midpoints of [0.1, 1] scaled by
// 10^(i-6), N_i = 2^i (signed, both signs) or 2^(i+1) (unsigned), plus 0 and 1, ascending.
std::vector<double> construction_rule(bool is_signed) {
  std::vector<double> values{0.0, 1.0};
  for (int i = 0; i <= 6; ++i) {
    const int n = is_signed ? (1 << i) : (1 << (i + 1));
    for (int k = 0; k < n; ++k) {
      const double v = std::pow(10.0, i - 6) * (0.1 + 0.9 * (2.0 * k + 1.0) / (2.0 * n));
      values.push_back(v);
      if (is_signed) values.push_back(-v);
    }
  }
  std::sort(values.begin(), values.end());
  return values;
}

// Distance in units in the last place between two finite floats of the same sign.
int64_t ulp_distance(float a, float b) {
  if (a == b) return 0;
  return std::llabs(static_cast<int64_t>(bits_of(a)) - static_cast<int64_t>(bits_of(b)));
}

TEST(BlockwiseQuantization, TablesFollowTheConstructionRuleWithinTwoUlp) {
  for (const auto kind : {QmapKind::signed_map, QmapKind::unsigned_map}) {
    const auto& table = qmap(kind);
    const std::vector<double> exact = construction_rule(kind == QmapKind::signed_map);
    ASSERT_EQ(exact.size(), 256u);
    int64_t worst = 0;
    for (int i = 0; i < 256; ++i) {
      // The frozen values carry the reference's own fp32 rounding (spec 1.5: <= 2 ulp).
      const int64_t d = ulp_distance(table[i], static_cast<float>(exact[i]));
      worst = std::max(worst, d);
      EXPECT_LE(d, 2) << "entry " << i << ": " << table[i] << " vs exact " << exact[i];
      if (i > 0) EXPECT_LT(table[i - 1], table[i]) << "not strictly ascending at " << i;
    }
    EXPECT_GE(worst, 1) << "the frozen tables are known not to be correctly rounded";
  }
}

TEST(BlockwiseQuantization, TablesHoldTheReferenceBitPatterns) {
  // Check values of spec 1.4 (also rows of adam8bit-qmap-*.tsv).
  const auto& s = qmap(QmapKind::signed_map);
  const auto& u = qmap(QmapKind::unsigned_map);
  const std::vector<std::pair<int, uint32_t>> signed_bits{
      {0, 0xbf7e3333}, {1, 0xbf7a9999}, {63, 0xbddb3334}, {64, 0xbdc9eb85}, {126, 0xb513a3b7},
      {127, 0x00000000}, {128, 0x3513a3b7}, {129, 0x365a1a94}, {191, 0x3ddb3334},
      {192, 0x3df80000}, {254, 0x3f7e3333}, {255, 0x3f800000}};
  const std::vector<std::pair<int, uint32_t>> unsigned_bits{
      {0, 0x00000000}, {1, 0x34ae7baa}, {2, 0x35500998}, {63, 0x3c2f5c2a}, {64, 0x3c466667},
      {126, 0x3dcb5c29}, {127, 0x3dd40000}, {128, 0x3de26666}, {129, 0x3df0cccd},
      {191, 0x3f0db334}, {192, 0x3f0f8000}, {254, 0x3f7f199a}, {255, 0x3f800000}};
  for (const auto& [i, b] : signed_bits) EXPECT_EQ(bits_of(s[i]), b) << "signed " << i;
  for (const auto& [i, b] : unsigned_bits) EXPECT_EQ(bits_of(u[i]), b) << "unsigned " << i;
  EXPECT_EQ(qmap_tensor(QmapKind::signed_map).numel(), 256);
}

TEST(BlockwiseQuantization, NearestCodeRoundsToNearestWithEvenTies) {
  for (const auto kind : {QmapKind::signed_map, QmapKind::unsigned_map}) {
    const float* t = qmap(kind).data();
    for (int k = 0; k < 256; ++k) EXPECT_EQ(nearest_code(t, t[k]), k) << "exact entry " << k;
    for (int k = 1; k < 256; ++k) {
      const float mid = (t[k - 1] + t[k]) * 0.5f;
      const int even = (k - 1) % 2 == 0 ? k - 1 : k;
      EXPECT_EQ(nearest_code(t, mid), even) << "tie between " << k - 1 << " and " << k;
      EXPECT_EQ(nearest_code(t, std::nextafter(mid, -2.0f)), k - 1) << "below midpoint " << k;
      EXPECT_EQ(nearest_code(t, std::nextafter(mid, 2.0f)), k) << "above midpoint " << k;
    }
    EXPECT_EQ(nearest_code(t, std::nanf("")), 0);
    EXPECT_EQ(nearest_code(t, -1.0f), 0);
    EXPECT_EQ(nearest_code(t, 1.5f), 255);
  }
}

TEST(BlockwiseQuantization, SignFixKeepsTinyNegativesNegative) {
  const float* t = qmap(QmapKind::signed_map).data();
  // |m|/absmax = 1e-7 is below the first non-zero code's midpoint (2.75e-7).
  EXPECT_EQ(quantize_signed(t, -1e-7f, 1.0f), 126);   // bumped from 127 (+0) to -5.5e-7
  EXPECT_EQ(quantize_signed(t, -0.0f, 1.0f), 126);    // -0 has the sign bit too
  EXPECT_EQ(quantize_signed(t, 1e-7f, 1.0f), 127);    // tiny positives become 0
  EXPECT_EQ(quantize_signed(t, 0.0f, 1.0f), 127);
  EXPECT_EQ(quantize_signed(t, -1.0f, 1.0f), 0);      // -0.99297, no -1 in the table
  EXPECT_EQ(quantize_signed(t, 1.0f, 1.0f), 255);
  // All-zero block: 0/0 = NaN -> 0, then the sign fix steps 0 - 1 -> 255 (uint8 wrap).
  EXPECT_EQ(quantize_signed(t, 0.0f, 0.0f), 255);
  EXPECT_EQ(dequantize(t, 255, 0.0f), 0.0f);
  const float* u = qmap(QmapKind::unsigned_map).data();
  EXPECT_EQ(quantize_unsigned(u, 0.0f, 0.0f), 0);
  EXPECT_EQ(quantize_unsigned(u, 1.5e-7f, 1.0f), 0);  // below 1.625e-7 -> 0
  EXPECT_EQ(quantize_unsigned(u, 1.7e-7f, 1.0f), 1);
}

TEST(BlockwiseQuantization, BlocksOfPartialLengthUseTheirOwnAbsmax) {
  torch::manual_seed(1);
  torch::Tensor x = torch::randn({300});                   // blocks [0, 256) and [256, 300)
  x.slice(0, 256).mul_(1e-3);                              // the last block is much smaller
  const QuantizedBlocks q = quantize_blockwise(x, QmapKind::signed_map);
  ASSERT_EQ(q.absmax.numel(), 2);
  EXPECT_EQ(q.absmax[0].item<float>(), x.slice(0, 0, 256).abs().max().item<float>());
  EXPECT_EQ(q.absmax[1].item<float>(), x.slice(0, 256).abs().max().item<float>());
  const torch::Tensor y = dequantize_blockwise(q, QmapKind::signed_map);
  // Each block's largest element is stored exactly (positive: code 255 = 1.0) or to 0.7%
  // (negative: -0.99297); the small block keeps its own relative precision.
  const torch::Tensor error = (y - x).abs();
  EXPECT_LT(error.slice(0, 256).max().item<float>(), 0.01f * q.absmax[1].item<float>());
  EXPECT_LT(error.slice(0, 0, 256).max().item<float>(), 0.01f * q.absmax[0].item<float>());
  // An all-zero block decodes to zeros.
  const QuantizedBlocks zero = quantize_blockwise(torch::zeros({256}), QmapKind::signed_map);
  EXPECT_TRUE(torch::all(zero.codes == 255).item<bool>());
  EXPECT_TRUE(torch::all(dequantize_blockwise(zero, QmapKind::signed_map) == 0).item<bool>());
}

TEST(BlockwiseQuantization, MeetsTheReferenceAccuracyThresholds) {
  // Spec 2.6 thresholds (set for 4096-element blocks; 256 is finer, so they must hold).
  torch::manual_seed(2);
  struct Case {
    torch::Tensor x;
    QmapKind kind;
    double max_abs, max_rel;
  };
  const std::vector<Case> cases{{torch::randn({512, 1024}), QmapKind::signed_map, 0.011, 0.018},
                                {torch::rand({512, 1024}), QmapKind::signed_map, 0.0036, 0.015},
                                {torch::rand({512, 1024}), QmapKind::unsigned_map, 0.0023, 0.012}};
  for (const Case& c : cases) {
    const torch::Tensor y =
        dequantize_blockwise(quantize_blockwise(c.x, c.kind), c.kind).reshape(c.x.sizes());
    const torch::Tensor abs_error = (y - c.x).abs();
    EXPECT_LT(abs_error.mean().item<double>(), c.max_abs);
    EXPECT_LT((abs_error / (c.x.abs() + 1e-8)).mean().item<double>(), c.max_rel);
  }
}

}  // namespace
}  // namespace sdtrain::optim
