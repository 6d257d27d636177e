// The CPU reference of 8-bit AdamW: against a float64 Adam (bitsandbytes' own acceptance
// protocol, spec section 8), its element rules, checkpoints, and the optimizer interface.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <limits>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/optim/adamw.h"
#include "sdtrain/optim/adamw8bit.h"
#include "sdtrain/optim/blockwise_quantization.h"
#include "sdtrain/optim/captured_arguments.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace sdtrain::optim {
namespace {

torch::Tensor make_parameter(torch::IntArrayRef shape, torch::ScalarType type, double scale) {
  return (torch::randn(shape, torch::kFloat64) * scale).to(type).set_requires_grad(true);
}

struct Thresholds {
  double mean_abs, mean_rel, rtol, atol;
};

// Spec 8: 50 steps; after each, the float64 reference is re-synchronised to the optimizer's
// parameter and decoded states, so errors do not accumulate.
void compare_with_float64_adam(torch::IntArrayRef shape, torch::ScalarType type,
                               const Thresholds& limits) {
  torch::manual_seed(7);
  OptimizerOptions options;
  options.lr = 1e-3;
  options.weight_decay = 0.0;
  torch::Tensor p = make_parameter(shape, type, 0.1);
  AdamW8bit optimizer({{"p", p}}, options);
  ASSERT_TRUE(optimizer.state(0).quantized);
  const int64_t n = p.numel();
  torch::Tensor m_ref = torch::zeros({n}, torch::kFloat64);
  torch::Tensor v_ref = torch::zeros({n}, torch::kFloat64);
  for (int step = 1; step <= 50; ++step) {
    const torch::Tensor g = (torch::randn(shape) * 0.01).to(type);
    torch::Tensor p_ref = p.detach().to(torch::kFloat64).reshape({-1});
    const torch::Tensor g64 = g.to(torch::kFloat64).reshape({-1});
    m_ref = options.beta1 * m_ref + (1 - options.beta1) * g64;
    v_ref = options.beta2 * v_ref + (1 - options.beta2) * g64 * g64;
    const double c1 = 1 - std::pow(options.beta1, step);
    const double c2 = 1 - std::pow(options.beta2, step);
    p_ref = p_ref - options.lr * (m_ref / c1) / ((v_ref / c2).sqrt() + options.eps);

    optimizer.step_parameter(0, g);
    const torch::Tensor p_got = p.detach().to(torch::kFloat64).reshape({-1});
    const torch::Tensor m_got = optimizer.exp_avg(0).to(torch::kFloat64);
    const torch::Tensor v_got = optimizer.exp_avg_sq(0).to(torch::kFloat64);

    for (const auto& [got, want, what] :
         {std::tuple{m_got, m_ref, "m"}, std::tuple{v_got, v_ref, "v"}}) {
      const int64_t outside =
          (~torch::isclose(got, want, /*rtol=*/1e-3, /*atol=*/3e-3)).sum().item<int64_t>();
      ASSERT_LT(outside, 20) << what << " at step " << step;
    }
    const torch::Tensor error = (p_got - p_ref).abs();
    ASSERT_LT(error.mean().item<double>(), limits.mean_abs) << "step " << step;
    ASSERT_LT((error / (p_ref.abs() + 1e-8)).mean().item<double>(), limits.mean_rel)
        << "step " << step;
    if (step % 10 == 0) {
      ASSERT_TRUE(torch::allclose(p_got, p_ref, limits.rtol, limits.atol)) << "step " << step;
    }
    m_ref = m_got;  // re-synchronise
    v_ref = v_got;
  }
}

TEST(AdamW8bitReference, MatchesFloat64AdamFp32) {
  const Thresholds fp32{6e-5, 6e-4, 1e-5, 1e-3};
  compare_with_float64_adam({16, 4097}, torch::kFloat32, fp32);
  compare_with_float64_adam({256, 32}, torch::kFloat32, fp32);
  compare_with_float64_adam({37, 1000}, torch::kFloat32, fp32);  // not a multiple of 256
}

TEST(AdamW8bitReference, MatchesFloat64AdamFp16AndBf16) {
  compare_with_float64_adam({24, 1000}, torch::kFloat16, {6e-5, 6e-4, 1e-5, 1e-3});
  compare_with_float64_adam({24, 1000}, torch::kBFloat16, {1.7e-4, 1.6e-3, 1e-4, 1e-2});
}

TEST(AdamW8bitReference, AbsmaxComesFromTheUpdatedStatesBeforeRequantization) {
  torch::manual_seed(3);
  OptimizerOptions options;
  torch::Tensor p = make_parameter({5000}, torch::kFloat32, 1.0);
  AdamW8bit optimizer({{"p", p}}, options);
  optimizer.step_parameter(0, torch::randn({5000}));
  // Decode with the old scales, update in fp32, and take the block max, independently.
  const torch::Tensor m_old = optimizer.exp_avg(0);
  const torch::Tensor v_old = optimizer.exp_avg_sq(0);
  const torch::Tensor g = torch::randn({5000});
  const AdamStepConstants c = AdamW8bit::step_constants(options, 2);
  const torch::Tensor m_new = m_old * c.beta1 + c.one_minus_beta1 * g;
  const torch::Tensor v_new = v_old * c.beta2 + (c.one_minus_beta2 * g) * g;
  optimizer.step_parameter(0, g);
  const auto& state = optimizer.state(0);
  ASSERT_EQ(state.absmax1.numel(), 20);  // ceil(5000 / 256), last block has 136 elements
  for (int64_t b = 0; b < 20; ++b) {
    const int64_t begin = b * 256;
    const int64_t end = std::min<int64_t>(5000, begin + 256);
    // fp32 fmaf vs separate rounding here: equal to within a few ulp.
    EXPECT_NEAR(state.absmax1[b].item<float>(), m_new.slice(0, begin, end).abs().max().item<float>(),
                1e-6 * state.absmax1[b].item<float>());
    EXPECT_NEAR(state.absmax2[b].item<float>(), v_new.slice(0, begin, end).abs().max().item<float>(),
                1e-6 * state.absmax2[b].item<float>());
  }
}

TEST(AdamW8bitReference, WeightDecayIsAppliedBeforeTheUpdateAsInTorchAdamW) {
  // One step with a large lr * wd, where the two orders differ by lr^2 wd = 5e-3:
  //   before (torch.optim.AdamW, chosen): p (1 - lr wd) - lr m_hat / (sqrt(v_hat) + eps)
  //   after  (bitsandbytes' CUDA kernel): (p - lr m_hat / (sqrt(v_hat) + eps)) (1 - lr wd)
  torch::manual_seed(4);
  OptimizerOptions options;
  options.lr = 0.1;
  options.weight_decay = 0.5;
  for (const int64_t n : {int64_t{8192}, int64_t{100}}) {  // 8-bit and fp32-state paths
    torch::Tensor p = make_parameter({n}, torch::kFloat32, 1.0);
    const torch::Tensor p0 = p.detach().to(torch::kFloat64);
    const torch::Tensor g = torch::randn({n});
    AdamW8bit optimizer({{"p", p}}, options);
    optimizer.step_parameter(0, g);
    const torch::Tensor g64 = g.to(torch::kFloat64);
    const torch::Tensor update = options.lr * g64 / (g64.abs() + options.eps);  // step 1
    const torch::Tensor before = p0 * (1 - options.lr * options.weight_decay) - update;
    const torch::Tensor after = (p0 - update) * (1 - options.lr * options.weight_decay);
    const torch::Tensor got = p.detach().to(torch::kFloat64);
    EXPECT_LT((got - before).abs().max().item<double>(), 1e-6) << "n = " << n;
    EXPECT_GT((got - after).abs().min().item<double>(), 4e-3) << "n = " << n;

    // The fp32 AdamW takes the same decision.
    torch::Tensor q = p0.to(torch::kFloat32).set_requires_grad(true);
    AdamW adamw({{"q", q}}, options);
    adamw.step_parameter(0, g);
    EXPECT_LT((q.detach().to(torch::kFloat64) - before).abs().max().item<double>(), 1e-6);
  }
}

TEST(AdamW8bitReference, NonFiniteGradientsResetStateAndLeaveTheParameter) {
  torch::manual_seed(5);
  OptimizerOptions options;
  options.weight_decay = 0.1;
  for (const int64_t n : {int64_t{4500}, int64_t{1000}}) {  // 8-bit and fp32-state paths
    torch::Tensor p = make_parameter({n}, torch::kFloat32, 1.0);
    AdamW8bit optimizer({{"p", p}}, options);
    for (int i = 0; i < 3; ++i) optimizer.step_parameter(0, torch::randn({n}));
    const torch::Tensor before = p.detach().clone();
    torch::Tensor g = torch::randn({n});
    const std::vector<int64_t> bad{5, 300, 301, n - 1};
    g[5] = std::numeric_limits<float>::quiet_NaN();
    g[300] = std::numeric_limits<float>::infinity();
    g[301] = -std::numeric_limits<float>::infinity();
    g[n - 1] = std::numeric_limits<float>::quiet_NaN();
    optimizer.step_parameter(0, g);
    const torch::Tensor m = optimizer.exp_avg(0);
    const torch::Tensor v = optimizer.exp_avg_sq(0);
    for (const int64_t i : bad) {
      EXPECT_EQ(p[i].item<float>(), before[i].item<float>()) << "element " << i;
      EXPECT_EQ(m[i].item<float>(), 0.0f) << "element " << i;
      EXPECT_EQ(v[i].item<float>(), 0.0f) << "element " << i;
    }
    EXPECT_TRUE(torch::isfinite(p).all().item<bool>());
    EXPECT_TRUE(torch::isfinite(m).all().item<bool>() && torch::isfinite(v).all().item<bool>());
    EXPECT_NE(p[6].item<float>(), before[6].item<float>());  // finite neighbours still move
    EXPECT_NE(v[6].item<float>(), 0.0f);
  }
}

TEST(AdamW8bitReference, ZeroGradientsStoreTheAllZeroBlockCodes) {
  OptimizerOptions options;
  options.lr = 0.01;
  options.weight_decay = 0.1;
  torch::Tensor p = torch::full({4097}, 2.0f).set_requires_grad(true);
  AdamW8bit optimizer({{"p", p}}, options);
  optimizer.step_parameter(0, torch::zeros({4097}));
  const auto& s = optimizer.state(0);
  EXPECT_TRUE(torch::all(s.state1 == 255).item<bool>());  // 0/0 -> NaN -> 0 -> sign fix -> 255
  EXPECT_TRUE(torch::all(s.state2 == 0).item<bool>());
  EXPECT_TRUE(torch::all(s.absmax1 == 0).item<bool>() && torch::all(s.absmax2 == 0).item<bool>());
  EXPECT_TRUE(torch::all(optimizer.exp_avg(0) == 0).item<bool>());
  // Only the decay moves p: 2 (1 - lr wd) = 1.998, the Adam term is 0 / (0 + eps) = 0.
  EXPECT_TRUE(torch::all(p == 2.0f * (1.0f - 0.001f)).item<bool>());
}

TEST(AdamW8bitReference, SmallTensorsKeepFp32States) {
  torch::Tensor a = make_parameter({4095}, torch::kFloat32, 1.0);
  torch::Tensor b = make_parameter({64, 64}, torch::kBFloat16, 1.0);
  torch::Tensor c = make_parameter({320}, torch::kFloat16, 1.0);
  AdamW8bit optimizer({{"a", a}, {"b", b}, {"c", c}}, OptimizerOptions{});
  EXPECT_FALSE(optimizer.state(0).quantized);
  EXPECT_EQ(optimizer.state(0).state1.scalar_type(), torch::kFloat32);
  EXPECT_TRUE(optimizer.state(1).quantized);  // exactly 4096
  EXPECT_EQ(optimizer.state(1).state1.scalar_type(), torch::kUInt8);
  EXPECT_EQ(optimizer.state(1).absmax1.numel(), 16);
  EXPECT_FALSE(optimizer.state(2).quantized);
  // 8 B for fp32-state elements; 2 B + 2 absmax per 256 for 8-bit ones; 2 KiB of tables.
  const int64_t expected = 8 * 4095 + (2 * 4096 + 2 * 16 * 4) + 8 * 320 + 2048;
  EXPECT_EQ(optimizer.state_bytes(), expected);
  EXPECT_EQ(adamw8bit_state_bytes({4095, 4096, 320}), expected);
  EXPECT_EQ(adamw_state_bytes({4095, 4096, 320}), 8 * (4095 + 4096 + 320));
  AdamW fp32({{"a", a}, {"b", b}, {"c", c}}, OptimizerOptions{});
  EXPECT_EQ(fp32.state_bytes(), adamw_state_bytes({4095, 4096, 320}));
  EXPECT_EQ(adamw8bit_state_bytes({100, 200}), 8 * 300);  // no tables without 8-bit tensors
}

// Parameters of three kinds: 8-bit fp32, 8-bit bf16 (partial last block), fp32 state fp16.
NamedParameters make_model(uint64_t seed) {
  torch::manual_seed(seed);
  return {{"w", make_parameter({40, 300}, torch::kFloat32, 0.1)},
          {"x", make_parameter({5000}, torch::kBFloat16, 0.1)},
          {"bias", make_parameter({77}, torch::kFloat16, 0.1)}};
}

void step_with_seeded_gradients(Optimizer& optimizer, int first, int count) {
  for (int s = first; s < first + count; ++s) {
    torch::manual_seed(1000 + s);
    for (const auto& [name, param] : optimizer.parameters()) {
      param.mutable_grad() = (torch::randn(param.sizes()) * 0.01).to(param.scalar_type());
    }
    optimizer.step();
    optimizer.zero_grad();
  }
}

void expect_same_state(const AdamW8bit& a, const AdamW8bit& b) {
  for (size_t i = 0; i < a.num_parameters(); ++i) {
    EXPECT_TRUE(torch::equal(a.parameters()[i].second, b.parameters()[i].second)) << i;
    EXPECT_EQ(a.step_count(i), b.step_count(i));
    const auto& sa = a.state(i);
    const auto& sb = b.state(i);
    EXPECT_TRUE(torch::equal(sa.state1, sb.state1) && torch::equal(sa.state2, sb.state2)) << i;
    if (sa.quantized) {
      EXPECT_TRUE(torch::equal(sa.absmax1, sb.absmax1) && torch::equal(sa.absmax2, sb.absmax2));
    }
  }
}

TEST(AdamW8bitReference, SaveLoadContinueEqualsUninterrupted) {
  OptimizerOptions options;
  options.lr = 3e-3;
  AdamW8bit uninterrupted(make_model(11), options);
  step_with_seeded_gradients(uninterrupted, 0, 10);

  AdamW8bit first(make_model(11), options);
  step_with_seeded_gradients(first, 0, 5);
  io::NamedTensors tensors;
  std::map<std::string, std::string> metadata;
  first.save_state(tensors, metadata);
  for (const auto& [name, param] : first.parameters()) tensors.emplace_back(name, param.detach());
  const auto path = testing::scratch_dir() / "optimizer.safetensors";
  io::save_safetensors(path, tensors, metadata);

  const io::SafetensorsFile file(path);
  NamedParameters restored = make_model(99);  // different values, overwritten from the file
  for (auto& [name, param] : restored) {
    torch::NoGradGuard no_grad;
    param.copy_(file.tensor(name));
  }
  AdamW8bit resumed(std::move(restored), options);
  resumed.load_state(file);
  EXPECT_EQ(resumed.step_count(0), 5);
  step_with_seeded_gradients(resumed, 5, 5);
  expect_same_state(uninterrupted, resumed);
}

TEST(AdamW8bitReference, RefusesCheckpointsWithAnotherBlockSizeOrTable) {
  AdamW8bit optimizer(make_model(12), OptimizerOptions{});
  step_with_seeded_gradients(optimizer, 0, 1);
  io::NamedTensors tensors;
  std::map<std::string, std::string> metadata;
  optimizer.save_state(tensors, metadata);
  const auto dir = testing::scratch_dir();

  auto expect_refused = [&](const io::NamedTensors& t, const std::map<std::string, std::string>& m,
                            const std::string& needle) {
    const auto path = dir / "bad.safetensors";
    io::save_safetensors(path, t, m);
    AdamW8bit other(make_model(12), OptimizerOptions{});
    try {
      other.load_state(io::SafetensorsFile(path));
      ADD_FAILURE() << "loaded a checkpoint that should be refused (" << needle << ")";
    } catch (const ModelError& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  auto old_block = metadata;
  old_block["optimizer.block_size"] = "2048";
  expect_refused(tensors, old_block, "block size 2048");

  io::NamedTensors bad_table = tensors;
  for (auto& [name, t] : bad_table) {
    if (name == "optimizer.qmap_unsigned") {
      t = t.clone();
      t[255] = 0.0933f;  // like the broken 0.36-0.41 unsigned map
    }
  }
  expect_refused(bad_table, metadata, "different quantization table 'optimizer.qmap_unsigned'");

  auto other_min = metadata;
  other_min["optimizer.min_8bit_size"] = "100";
  expect_refused(tensors, other_min, "min_8bit_size");

  auto adamw_type = metadata;
  adamw_type["optimizer.type"] = "adamw";
  expect_refused(tensors, adamw_type, "optimizer.type = 'adamw'");
}

// Captured updates (captured_arguments.h): before each replay the host writes, at the offsets
// the capture recorded, the constants an eager step would use at the next count and the skip
// flag; a real replay counts the step, a dry one counts nothing and points every update at
// the dry flag. Pointers and other bytes of the table stay as captured.
TEST(CapturedArguments, AReplayGetsTheEagerStepsConstantsAndCountsIt) {
  OptimizerOptions options;
  options.lr = 3e-4;
  options.weight_decay = 0.1;
  options.stochastic_rounding = true;
  options.rounding_seed = 11;
  const float flag = 0.0f, dry_flag = 1.0f;
  CapturedArguments captured;
  captured.table.assign(256, 0xAB);
  // Parameter 2 at bytes 0.., parameter 0 at bytes 96.. (its update captured without a flag).
  captured.arguments = {{2, 8, 72, &flag}, {0, 104, 168, nullptr}};
  std::vector<int64_t> counts = {4, 9, 0};
  const auto count_of = [&](size_t i) -> int64_t& { return counts.at(i); };
  const auto constants_at = [&](size_t at) {
    AdamStepConstants c;
    std::memcpy(&c, captured.table.data() + at, sizeof c);
    return c;
  };
  const auto skip_at = [&](size_t at) {
    const float* skip = nullptr;
    std::memcpy(&skip, captured.table.data() + at, sizeof skip);
    return skip;
  };
  const auto same = [](const AdamStepConstants& a, const AdamStepConstants& b) {
    return std::memcmp(&a, &b, sizeof a) == 0;
  };

  write_replay_arguments(captured, options, count_of, /*dry=*/false, &dry_flag);
  EXPECT_EQ(counts, (std::vector<int64_t>{5, 9, 1}));
  EXPECT_TRUE(same(constants_at(8), AdamW8bit::step_constants(options, 1, 2)));
  EXPECT_TRUE(same(constants_at(104), AdamW8bit::step_constants(options, 5, 0)));
  EXPECT_EQ(skip_at(72), &flag);
  EXPECT_EQ(skip_at(168), nullptr);
  EXPECT_EQ(captured.table[0], 0xAB);  // the captured pointers before the constants
  EXPECT_EQ(captured.table[255], 0xAB);

  options.lr = 1e-4;  // the schedule moved on
  write_replay_arguments(captured, options, count_of, /*dry=*/true, &dry_flag);
  EXPECT_EQ(counts, (std::vector<int64_t>{5, 9, 1}));
  EXPECT_TRUE(same(constants_at(8), AdamW8bit::step_constants(options, 2, 2)));
  EXPECT_TRUE(same(constants_at(104), AdamW8bit::step_constants(options, 6, 0)));
  EXPECT_EQ(skip_at(72), &dry_flag);
  EXPECT_EQ(skip_at(168), &dry_flag);
}

TEST(CapturedArguments, OnlyAdamW8bitCanBeCapturedAndNeverOnTheCpu) {
  NamedParameters parameters = {{"w", torch::zeros({4}).set_requires_grad(true)}};
  AdamW adamw(parameters, OptimizerOptions{});
  EXPECT_FALSE(adamw.graph_capturable());
  EXPECT_THROW(adamw.begin_graph_capture(), std::logic_error);
  AdamW8bit adamw8bit(parameters, OptimizerOptions{});
  EXPECT_TRUE(adamw8bit.graph_capturable());
  EXPECT_ANY_THROW(adamw8bit.begin_graph_capture());  // a CPU parameter
  EXPECT_ANY_THROW(adamw8bit.prepare_replay(false));  // nothing captured
}

// A channels-last convolution weight (compute.channels_last) steps element for element as a
// contiguous tensor holding its storage (its NHWC permutation) does, whether its gradient comes
// channels-last (autograd's layout contract) or NCHW: the flat 8-bit states and their
// quantization blocks follow the parameter's storage order. Exact: the same arithmetic on the
// same elements in the same order.
TEST(AdamW8bitReference, AChannelsLastParameterStepsInItsStorageOrder) {
  torch::manual_seed(11);
  const torch::Tensor start = torch::randn({64, 40, 3, 3}) * 0.05;  // 23,040: quantized states
  const auto nhwc_order = [](const torch::Tensor& t) { return t.permute({0, 2, 3, 1}).contiguous(); };
  torch::Tensor flat = nhwc_order(start).set_requires_grad(true);
  torch::Tensor weight = start.contiguous(torch::MemoryFormat::ChannelsLast).set_requires_grad(true);
  ASSERT_FALSE(weight.is_contiguous());
  AdamW8bit reference({{"w", flat}}, OptimizerOptions{});
  AdamW8bit channels_last({{"w", weight}}, OptimizerOptions{});
  ASSERT_TRUE(reference.state(0).quantized);
  for (int step = 0; step < 4; ++step) {
    const torch::Tensor g = torch::randn(start.sizes()) * 0.01;
    reference.step_parameter(0, nhwc_order(g));
    // Odd steps hand the channels-last weight an NCHW gradient.
    channels_last.step_parameter(0, step % 2 ? g : g.contiguous(torch::MemoryFormat::ChannelsLast));
    ASSERT_TRUE(torch::equal(flat.detach(), nhwc_order(weight.detach()))) << "step " << step;
  }
  EXPECT_TRUE(weight.is_contiguous(torch::MemoryFormat::ChannelsLast));
  // A parameter that is no dense layout is refused where the optimizer is made.
  torch::Tensor strided = torch::randn({8, 8}).t().narrow(0, 0, 4).set_requires_grad(true);
  EXPECT_THROW(AdamW8bit({{"s", strided}}, OptimizerOptions{}), ConfigError);
}

TEST(OptimizerInterface, FactoryLrAndGradients) {
  NamedParameters params = make_model(13);
  auto a = make_optimizer("adamw8bit", params, OptimizerOptions{});
  auto b = make_optimizer("adamw", params, OptimizerOptions{});
  EXPECT_EQ(a->name(), "adamw8bit");
  EXPECT_EQ(b->name(), "adamw");
  EXPECT_THROW(make_optimizer("sgd", params, OptimizerOptions{}), ConfigError);
  try {
    make_optimizer("adam8bit", params, OptimizerOptions{});
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("\"adamw8bit\""), std::string::npos);
  }
  a->set_lr(0.25);
  EXPECT_EQ(a->lr(), 0.25);
  // Only parameters with a gradient step; the others keep step 0 and their values.
  const torch::Tensor untouched = params[1].second.detach().clone();
  params[0].second.mutable_grad() = torch::ones_like(params[0].second);
  a->step();
  EXPECT_EQ(a->step_count(0), 1);
  EXPECT_EQ(a->step_count(1), 0);
  EXPECT_TRUE(torch::equal(params[1].second, untouched));
  a->zero_grad(/*set_to_none=*/false);
  EXPECT_TRUE(params[0].second.grad().defined());
  EXPECT_EQ(params[0].second.grad().abs().sum().item<float>(), 0.0f);
  a->zero_grad();
  EXPECT_FALSE(params[0].second.grad().defined());
  EXPECT_THROW(a->step_parameter(0, torch::ones({3})), c10::Error);  // wrong shape
}

}  // namespace
}  // namespace sdtrain::optim
