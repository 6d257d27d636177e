// Building blocks on their own: the generic checkpoint function, the timestep embedding and the
// fp32-upcast attention path (which the fp32 parity tests cannot reach).

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/autocast_mode.h>

#include <cmath>

#include "sdtrain/models/attention_processor.h"
#include "sdtrain/models/embeddings.h"
#include "sdtrain/models/gradient_checkpointing.h"

using namespace sdtrain::models;

namespace {

TEST(Checkpoint, GradientsReachParametersAndInputs) {
  torch::manual_seed(0);
  torch::nn::Linear a(6, 5), b(5, 3);
  auto block = [a, b](const std::vector<torch::Tensor>& in) mutable {
    // in[1] is an integer tensor that needs no gradient; in[2] a frozen float tensor.
    return b(torch::gelu(a(in[0]) * in[1].to(torch::kFloat).unsqueeze(-1))) + in[2];
  };
  torch::Tensor x = torch::randn({4, 6}).requires_grad_(true);
  torch::Tensor ids = torch::tensor({1, 2, 3, 4});
  torch::Tensor frozen = torch::randn({4, 3});
  std::vector<torch::Tensor> params = a->parameters();
  for (const auto& p : b->parameters()) params.push_back(p);

  torch::Tensor plain = block({x, ids, frozen});
  plain.pow(2).sum().backward();
  std::vector<torch::Tensor> expected_grads;
  for (const auto& p : params) expected_grads.push_back(p.grad().clone()), p.mutable_grad().zero_();
  torch::Tensor expected_x = x.grad().clone();
  x.mutable_grad().zero_();

  torch::Tensor out = checkpoint(block, {x, ids, frozen}, params);
  EXPECT_TRUE(torch::equal(out, plain));
  EXPECT_TRUE(out.requires_grad());
  out.pow(2).sum().backward();
  for (std::size_t i = 0; i < params.size(); ++i) EXPECT_TRUE(torch::equal(params[i].grad(), expected_grads[i])) << i;
  EXPECT_TRUE(torch::equal(x.grad(), expected_x));
}

TEST(Checkpoint, ParametersGetGradientsWhenNoInputRequiresGrad) {
  torch::manual_seed(1);
  torch::nn::Linear layer(3, 3);
  torch::Tensor x = torch::randn({2, 3});  // e.g. a frozen embedding's output
  auto fn = [layer](const std::vector<torch::Tensor>& in) mutable { return layer(in[0]); };
  torch::Tensor out = checkpoint(fn, {x}, *layer);
  ASSERT_TRUE(out.requires_grad());
  out.sum().backward();
  ASSERT_TRUE(layer->weight.grad().defined());
  // d(sum(W x + b))/dW[i][j] = sum over the batch of x[:, j].
  EXPECT_TRUE(torch::allclose(layer->weight.grad(), x.sum(0).unsqueeze(0).expand({3, 3})));
}

TEST(Checkpoint, WorksWithAutogradGrad) {
  torch::nn::Linear layer(2, 2);
  torch::Tensor x = torch::randn({1, 2}, torch::requires_grad());
  auto fn = [layer](const std::vector<torch::Tensor>& in) mutable { return layer(in[0]).tanh(); };
  auto grads = torch::autograd::grad({checkpoint(fn, {x}, *layer).sum()}, {x, layer->weight});
  auto expected = torch::autograd::grad({fn({x}).sum()}, {x, layer->weight});
  EXPECT_TRUE(torch::equal(grads[0], expected[0]));
  EXPECT_TRUE(torch::equal(grads[1], expected[1]));
}

TEST(TimestepEmbedding, MatchesTheFormula) {
  // dim 8, flip_sin_to_cos: [cos(t*f_0..3), sin(t*f_0..3)] with f_i = 10000^(-i/4).
  torch::Tensor t = torch::tensor({0.0, 1.0, 999.5});
  torch::Tensor emb = get_timestep_embedding(t, 8, true, 0.0);
  ASSERT_EQ(emb.sizes(), (std::vector<int64_t>{3, 8}));
  EXPECT_EQ(emb.scalar_type(), torch::kFloat);
  for (int64_t row = 0; row < 3; ++row) {
    for (int64_t i = 0; i < 4; ++i) {
      const double f = std::exp(-std::log(10000.0) * i / 4.0);
      const double arg = t[row].item<double>() * f;
      EXPECT_NEAR(emb[row][i].item<double>(), std::cos(arg), 2e-4) << row << "," << i;
      EXPECT_NEAR(emb[row][4 + i].item<double>(), std::sin(arg), 2e-4) << row << "," << i;
    }
  }
  torch::Tensor unflipped = get_timestep_embedding(t, 8, false, 1.0);
  EXPECT_NEAR(unflipped[1][1].item<double>(), std::sin(std::exp(-std::log(10000.0) / 3.0)), 1e-6);  // shift 1: /(4-1)
  EXPECT_EQ(get_timestep_embedding(t, 9, true, 0.0).size(1), 9);  // odd: zero padded
}

TEST(Attention, UpcastPathAvoidsHalfOverflow) {
  // Scores of ~1e5 (|q|,|k| ~ 800) overflow fp16 (max 65504) if QK^T is computed in half; the fp32 path
  // (upcast_attention) gets the fp32 result to fp16 rounding.
  torch::manual_seed(2);
  torch::Tensor q = torch::randn({1, 2, 5, 64}) * 100, k = torch::randn({1, 2, 7, 64}) * 100, v = torch::randn({1, 2, 7, 64});
  torch::Tensor reference = at::scaled_dot_product_attention(q, k, v);
  torch::Tensor upcast = dot_product_attention(q.to(torch::kHalf), k.to(torch::kHalf), v.to(torch::kHalf), true);
  EXPECT_EQ(upcast.scalar_type(), torch::kHalf);
  EXPECT_TRUE(torch::isfinite(upcast).all().item<bool>());
  EXPECT_LT((upcast.to(torch::kFloat) - reference).abs().max().item<double>(), 2e-2);
  torch::Tensor scores_half = torch::matmul(q.to(torch::kHalf), k.to(torch::kHalf).transpose(-1, -2));
  EXPECT_FALSE(torch::isfinite(scores_half).all().item<bool>()) << "test inputs do not overflow fp16";
  // Under CPU autocast (bf16) the fp32 computation is kept, not cast back down.
  {
    at::autocast::set_autocast_enabled(at::kCPU, true);
    torch::Tensor under_autocast = dot_product_attention(q.to(torch::kBFloat16), k.to(torch::kBFloat16), v.to(torch::kBFloat16), true);
    at::autocast::set_autocast_enabled(at::kCPU, false);
    torch::Tensor expected = dot_product_attention(q.to(torch::kBFloat16), k.to(torch::kBFloat16), v.to(torch::kBFloat16), true);
    EXPECT_TRUE(torch::equal(under_autocast, expected));
  }
  // fp32 inputs ignore the flag (diffusers' SDPA processor does too).
  EXPECT_TRUE(torch::equal(dot_product_attention(q, k, v, true), reference));
}

}  // namespace
