// The fused GroupNorm + SiLU (include/sdtrain/models/group_norm_silu.h) against torch's
// silu(group_norm(x)) and autograd. On the CPU the node runs the reference formulas, so these
// tests check the formulas; the CUDA kernels are checked against the same reference on a GPU
// (skipped without one, with the reason).
#include "sdtrain/models/group_norm_silu.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/models/resnet.h"
#include "sdtrain/train/mixed_precision.h"

namespace sdtrain::models {
namespace {

#if SDTRAIN_WITH_CUDA
constexpr bool kCudaBuild = true;
#else
constexpr bool kCudaBuild = false;
#endif

struct Inputs {
  torch::Tensor x, weight, bias, dy;
};

Inputs make_inputs(std::vector<int64_t> shape, torch::ScalarType x_type,
                   torch::ScalarType weight_type, const torch::Device& device, uint64_t seed) {
  torch::manual_seed(seed);
  const int64_t channels = shape[1];
  Inputs in;
  // An offset mean and a spread like a conv's output, so the variance is not trivially 1.
  in.x = (torch::randn(shape, torch::kDouble) * 1.7 + 0.6).to(device, x_type);
  in.weight = (1 + 0.3 * torch::randn({channels}, torch::kDouble)).to(device, weight_type);
  in.bias = (0.2 * torch::randn({channels}, torch::kDouble)).to(device, weight_type);
  in.dy = torch::randn(shape, torch::kDouble).to(device, x_type);
  return in;
}

struct Results {
  torch::Tensor y, dx, dweight, dbias;
};

// y and the three gradients of sum(y * dy), through `fn`.
template <typename Fn>
Results run(const Inputs& in, Fn fn) {
  Inputs leaves{in.x.detach().requires_grad_(), in.weight.detach().requires_grad_(),
                in.bias.detach().requires_grad_(), in.dy};
  torch::Tensor y = fn(leaves.x, leaves.weight, leaves.bias);
  y.backward(in.dy.to(y.scalar_type()));
  return {y.detach(), leaves.x.grad(), leaves.weight.grad(), leaves.bias.grad()};
}

Results run_torch(const Inputs& in, int64_t groups, double eps,
                  NormActivation activation = NormActivation::silu) {
  return run(in, [&](const auto& x, const auto& w, const auto& b) {
    const torch::Tensor y = torch::group_norm(x, groups, w, b, eps);
    return activation == NormActivation::silu ? torch::silu(y) : y;
  });
}

Results run_fused(const Inputs& in, int64_t groups, double eps,
                  NormActivation activation = NormActivation::silu) {
  return run(in, [&](const auto& x, const auto& w, const auto& b) {
    return activation == NormActivation::silu ? fused_group_norm_silu(x, w, b, groups, eps)
                                              : fused_group_norm(x, w, b, groups, eps);
  });
}

// Largest |a - b| relative to 1 + max |b|.
double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  const auto ad = a.to(torch::kCPU, torch::kDouble), bd = b.to(torch::kCPU, torch::kDouble);
  return ((ad - bd).abs().max() / (1 + bd.abs().max())).item<double>();
}

void expect_close(const Results& got, const Results& want, double tolerance) {
  EXPECT_LE(relative_error(got.y, want.y), tolerance) << "y";
  EXPECT_LE(relative_error(got.dx, want.dx), tolerance) << "dx";
  EXPECT_LE(relative_error(got.dweight, want.dweight), tolerance) << "dweight";
  EXPECT_LE(relative_error(got.dbias, want.dbias), tolerance) << "dbias";
}

// In fp64 both sides compute the same function in a different order: they agree to rounding
// (about 1e-15 relative; 1e-12 leaves room for the sums over a group). A wrong term in the
// backward formula differs by the size of that term, far above it.
TEST(FusedGroupNormSiLU, FormulasGiveTorchsValueAndGradientsInDouble) {
  for (const auto& shape :
       std::vector<std::vector<int64_t>>{{2, 8, 5, 3}, {3, 6, 7}, {1, 4, 2, 2, 3}}) {
    const Inputs in = make_inputs(shape, torch::kDouble, torch::kDouble, torch::kCPU, 11);
    expect_close(run_fused(in, 2, 1e-6), run_torch(in, 2, 1e-6), 1e-12);
    expect_close(run_fused(in, shape[1], 1e-5), run_torch(in, shape[1], 1e-5), 1e-12);
  }
}

// fp32 at SD's shapes of one group (10 channels of 8x8): rounding of fp32 sums over 640
// elements, about 1e-6 relative.
TEST(FusedGroupNormSiLU, Float32MatchesTorchToRounding) {
  const Inputs in = make_inputs({2, 320, 8, 8}, torch::kFloat, torch::kFloat, torch::kCPU, 12);
  expect_close(run_fused(in, 32, 1e-5), run_torch(in, 32, 1e-5), 2e-5);
}

// fp16 activations with fp32 weights, as under autocast: the node returns fp16, rounded once
// from the fp32 value torch's fp32 path computes; gradients of x in fp16 and of the weights in
// fp32. The tolerance is fp16's rounding (2^-11 relative) with room for the fp16 dy.
TEST(FusedGroupNormSiLU, HalfActivationsWithFloatWeightsRoundTheFloatResult) {
  const Inputs in = make_inputs({2, 64, 6, 6}, torch::kHalf, torch::kFloat, torch::kCPU, 13);
  const Results fused = run_fused(in, 32, 1e-6);
  EXPECT_EQ(fused.y.scalar_type(), torch::kHalf);
  EXPECT_EQ(fused.dx.scalar_type(), torch::kHalf);
  EXPECT_EQ(fused.dweight.scalar_type(), torch::kFloat);
  const Inputs as_float{in.x.to(torch::kFloat), in.weight, in.bias, in.dy.to(torch::kFloat)};
  expect_close(fused, run_torch(as_float, 32, 1e-6), 2e-3);
}

// Without the SiLU (an attention block's GroupNorm, fused_group_norm): torch's group_norm and
// its gradients, in fp64 to rounding (as above) and in fp16 with fp32 weights, as under
// autocast, to fp16's rounding of the fp32 result (as above).
TEST(FusedGroupNorm, FormulasGiveTorchsValueAndGradients) {
  for (const auto& shape : std::vector<std::vector<int64_t>>{{2, 8, 5, 3}, {3, 6, 7}}) {
    const Inputs in = make_inputs(shape, torch::kDouble, torch::kDouble, torch::kCPU, 21);
    expect_close(run_fused(in, 2, 1e-6, NormActivation::none),
                 run_torch(in, 2, 1e-6, NormActivation::none), 1e-12);
  }
  const Inputs in = make_inputs({2, 64, 6, 6}, torch::kHalf, torch::kFloat, torch::kCPU, 22);
  const Results fused = run_fused(in, 32, 1e-6, NormActivation::none);
  EXPECT_EQ(fused.y.scalar_type(), torch::kHalf);
  const Inputs as_float{in.x.to(torch::kFloat), in.weight, in.bias, in.dy.to(torch::kFloat)};
  expect_close(fused, run_torch(as_float, 32, 1e-6, NormActivation::none), 2e-3);
}

// The module keeps GroupNorm's parameters, is fused by set_fused_group_norm_silu with the
// GroupNorm + SiLU modules, and gives torch's output fused or not.
TEST(FusedGroupNorm, TheModuleIsFusedWithTheOthersAndGivesTorchsOutput) {
  torch::nn::Sequential net(FusedGroupNorm(torch::nn::GroupNormOptions(4, 8).eps(1e-6)),
                            GroupNormSiLU(torch::nn::GroupNormOptions(4, 8)));
  EXPECT_EQ(net->named_parameters().size(), 4u);
  EXPECT_EQ(set_fused_group_norm_silu(*net, true), 2);
  auto norm = net[0]->as<FusedGroupNormImpl>();
  ASSERT_NE(norm, nullptr);
  EXPECT_TRUE(norm->fused);
  torch::manual_seed(23);
  torch::nn::init::normal_(norm->weight);
  const torch::Tensor x = torch::randn({2, 8, 5, 5}, torch::kDouble);
  norm->to(torch::kDouble);
  const torch::Tensor want = torch::group_norm(x, 4, norm->weight, norm->bias, 1e-6);
  EXPECT_LE(relative_error(norm->forward(x), want), 1e-12);
  EXPECT_EQ(set_fused_group_norm_silu(*net, false), 2);
  EXPECT_FALSE(norm->fused);
  EXPECT_LE(relative_error(norm->forward(x), want), 1e-12);
}

TEST(FusedGroupNormSiLU, RefusesChannelsThatDoNotSplitIntoTheGroups) {
  const Inputs in = make_inputs({1, 6, 2, 2}, torch::kFloat, torch::kFloat, torch::kCPU, 14);
  EXPECT_THROW(fused_group_norm_silu(in.x, in.weight, in.bias, 4, 1e-6), c10::Error);
}

// The module keeps GroupNorm's parameter names, and a resnet gives the same output and
// gradients fused or not (fp32, rounding as above).
// A GroupNorm without an affine transform has no weight for the fused node: it runs torch's
// operations, fused or not.
TEST(FusedGroupNormSiLU, AModuleWithoutAffineRunsTorchsOperations) {
  GroupNormSiLU norm(torch::nn::GroupNormOptions(4, 16).affine(false));
  norm->fused = true;
  const torch::Tensor x = torch::randn({2, 16, 5, 5});
  EXPECT_TRUE(torch::equal(norm->forward(x), torch::silu(torch::group_norm(x, 4))));
}

TEST(FusedGroupNormSiLU, AResnetGivesTheSameOutputAndGradientsFusedOrNot) {
  torch::manual_seed(15);
  ResnetBlock2D block(ResnetBlock2DOptions(32, 64).temb_channels(16).groups(8));
  const auto names = block->named_parameters().keys();
  EXPECT_NE(std::find(names.begin(), names.end(), "norm1.weight"), names.end());
  EXPECT_NE(std::find(names.begin(), names.end(), "norm2.bias"), names.end());
  const torch::Tensor x = torch::randn({2, 32, 8, 8}), temb = torch::randn({2, 16});
  auto forward_backward = [&](bool fused) {
    set_fused_group_norm_silu(*block, fused);
    EXPECT_EQ(block->norm1->fused, fused);
    EXPECT_EQ(block->norm2->fused, fused);
    block->zero_grad();
    torch::Tensor out = block->forward(x, temb);
    out.square().sum().backward();
    return std::make_pair(out.detach(), block->norm1->weight.grad().clone());
  };
  const auto [plain, plain_grad] = forward_backward(false);
  const auto [fused, fused_grad] = forward_backward(true);
  EXPECT_LE(relative_error(fused, plain), 2e-5);
  EXPECT_LE(relative_error(fused_grad, plain_grad), 2e-5);
}

#define SDTRAIN_REQUIRE_CUDA()                                                          \
  do {                                                                                  \
    if (!kCudaBuild) GTEST_SKIP() << "built without CUDA kernels";                      \
    if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine"; \
  } while (0)

void expect_kernels_match_reference(const Inputs& in, int64_t groups, NormActivation activation,
                                    double tolerance) {
  const auto [y, mean, rstd] =
      detail::group_norm_silu_forward(in.x, in.weight, in.bias, groups, 1e-6, activation);
  const auto [y_ref, mean_ref, rstd_ref] =
      detail::group_norm_silu_forward_reference(in.x, in.weight, in.bias, groups, 1e-6, activation);
  EXPECT_LE(relative_error(y, y_ref), tolerance) << "y";
  EXPECT_LE(relative_error(mean, mean_ref), 1e-5) << "mean";
  EXPECT_LE(relative_error(rstd, rstd_ref), 1e-5) << "rstd";
  const auto [dx, dw, db] = detail::group_norm_silu_backward(
      in.dy, in.x, in.weight, in.bias, mean_ref, rstd_ref, groups, activation, true);
  const auto [dx_ref, dw_ref, db_ref] = detail::group_norm_silu_backward_reference(
      in.dy, in.x, in.weight, in.bias, mean_ref, rstd_ref, groups, activation, true);
  EXPECT_LE(relative_error(dx, dx_ref), tolerance) << "dx";
  EXPECT_LE(relative_error(dw, dw_ref), tolerance) << "dweight";
  EXPECT_LE(relative_error(db, db_ref), tolerance) << "dbias";
  EXPECT_EQ(dw.scalar_type(), in.weight.scalar_type());
  // Channels-last in, channels-last out: the next convolution reads it without a transpose.
  const auto layout = in.x.is_contiguous() ? torch::MemoryFormat::Contiguous
                                           : torch::MemoryFormat::ChannelsLast;
  EXPECT_TRUE(y.is_contiguous(layout)) << "y's layout";
  EXPECT_TRUE(dx.is_contiguous(layout)) << "dx's layout";
}

// The CUDA path's value, statistics and gradients against the reference on the same inputs,
// with the SiLU and without (an attention block's GroupNorm).
void expect_kernels_match_reference(const Inputs& in, int64_t groups, double tolerance) {
  for (const NormActivation activation : {NormActivation::silu, NormActivation::none}) {
    SCOPED_TRACE(activation == NormActivation::silu ? "with SiLU" : "GroupNorm alone");
    expect_kernels_match_reference(in, groups, activation, tolerance);
  }
}

struct KernelCase {
  torch::ScalarType x, weight;
  double tolerance;
};

// Every storage pair the kernels take, with its tolerance (below).
const std::vector<KernelCase> kKernelCases{{torch::kFloat, torch::kFloat, 2e-5},
                                           {torch::kHalf, torch::kFloat, 2e-3},
                                           {torch::kHalf, torch::kHalf, 2e-3},
                                           {torch::kBFloat16, torch::kFloat, 1.6e-2},
                                           {torch::kBFloat16, torch::kBFloat16, 1.6e-2}};

// The CUDA kernels against the reference formulas run on the same CUDA tensors, for every
// storage pair the kernels take: at odd sizes (a partial warp, hw of 1, rows that are no whole
// number of 16-byte vectors: the element-by-element path), at SD's (a group of 40,960
// elements), at long rows like the VAE's (65,536 elements: several tiles per row), and
// with tensors that start one element past 16-byte alignment (the element-by-element path on
// a vector-friendly shape). Tolerance: the output dtype's rounding (fp32 1e-5 with room for
// sums in another order; fp16 2^-11 and bf16 2^-8, doubled for the recomputed activation).
TEST(FusedGroupNormSiLU, CudaKernelsMatchTheReference) {
  SDTRAIN_REQUIRE_CUDA();
  const torch::Device cuda(torch::kCUDA);
  struct Shape {
    std::vector<int64_t> sizes;
    int64_t groups;
    bool misaligned = false;
  };
  const std::vector<Shape> shapes{{{3, 6, 7, 5}, 3},        {{2, 4, 1, 1}, 2},
                                  {{2, 320, 64, 64}, 32},   {{1, 128, 33, 31}, 32},
                                  {{1, 128, 256, 256}, 32}, {{2, 64, 16, 16}, 32, true}};
  for (const KernelCase& c : kKernelCases) {
    for (const auto& [shape, groups, misaligned] : shapes) {
      SCOPED_TRACE(::testing::Message()
                   << c10::toString(c.x) << "/" << c10::toString(c.weight) << " "
                   << torch::IntArrayRef(shape) << (misaligned ? " misaligned" : ""));
      Inputs in = make_inputs(shape, c.x, c.weight, cuda, 16);
      if (misaligned) {
        for (torch::Tensor* t : {&in.x, &in.dy}) {
          torch::Tensor buffer = torch::empty({t->numel() + 1}, t->options());
          torch::Tensor view = buffer.narrow(0, 1, t->numel()).view(t->sizes());
          *t = view.copy_(*t);
        }
      }
      expect_kernels_match_reference(in, groups, c.tolerance);
    }
  }
}

// Channels-last (NHWC) inputs take their own kernels (src/models/group_norm_silu_nhwc.cu): one
// thread per channel and pixel lane in the reductions, so the shapes cover fewer channels than
// a CTA's threads (6, 128: several lanes per channel, tiles shorter than the lanes), more
// (1280: a thread takes several channels), channel counts that are not whole 16-byte vectors
// (6, 20), a VAE-sized sample, and SD's 64x64 latents.
TEST(FusedGroupNormSiLU, ChannelsLastCudaKernelsMatchTheReference) {
  SDTRAIN_REQUIRE_CUDA();
  const torch::Device cuda(torch::kCUDA);
  const std::vector<std::pair<std::vector<int64_t>, int64_t>> shapes{
      {{3, 6, 7, 5}, 3},     {{2, 20, 3, 2}, 4},      {{2, 320, 64, 64}, 32},
      {{1, 128, 33, 31}, 32}, {{2, 1280, 8, 8}, 32}, {{1, 128, 256, 256}, 32}};
  for (const KernelCase& c : kKernelCases) {
    for (const auto& [shape, groups] : shapes) {
      SCOPED_TRACE(::testing::Message() << c10::toString(c.x) << "/" << c10::toString(c.weight)
                                        << " " << torch::IntArrayRef(shape) << " channels-last");
      Inputs in = make_inputs(shape, c.x, c.weight, cuda, 18);
      in.x = in.x.contiguous(torch::MemoryFormat::ChannelsLast);
      in.dy = in.dy.contiguous(torch::MemoryFormat::ChannelsLast);
      ASSERT_FALSE(in.x.is_contiguous());
      expect_kernels_match_reference(in, groups, c.tolerance);
    }
  }
}

// Under fp16 autocast the fused node gives what torch's autocast path gives (group_norm in
// fp32, SiLU in fp32), rounded once to fp16, and gradients to the same tolerance.
TEST(FusedGroupNormSiLU, UnderAutocastOnCudaMatchesTorch) {
  SDTRAIN_REQUIRE_CUDA();
  const Inputs in =
      make_inputs({2, 320, 32, 32}, torch::kHalf, torch::kFloat, torch::Device(torch::kCUDA), 17);
  train::AutocastGuard autocast(torch::kCUDA, train::Precision::fp16, true);
  const Results fused = run_fused(in, 32, 1e-6);
  const Results plain = run_torch(in, 32, 1e-6);
  EXPECT_EQ(fused.y.scalar_type(), torch::kHalf);
  expect_close(fused, plain, 2e-3);
}

}  // namespace
}  // namespace sdtrain::models
