// LoRALinear (include/sdtrain/models/lora.h): without an adapter it is torch::nn::Linear to the
// bit; with one it computes what peft's LoraLayer computes (tests/fixtures/lora, written by
// tools/make_lora_fixtures.py with peft 0.21.2); the adapter starts as peft's "gaussian" init
// (B = 0: the output is unchanged) and its keys are diffusers' LoRA keys.
#include "sdtrain/models/lora.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/lora_adapters.h"
#include "sdtrain/models/attention_processor.h"
#include "sdtrain/train/mixed_precision.h"
#include "test_support.h"

namespace sdtrain::models {
namespace {

io::SafetensorsFile peft_fixture() {
  return io::SafetensorsFile(testing::fixture("lora/linear.safetensors"));
}

LoRALinear fixture_layer(const io::SafetensorsFile& file) {
  LoRALinear layer(torch::nn::LinearOptions(24, 16));
  torch::NoGradGuard no_grad;
  layer->weight.copy_(file.tensor("weight"));
  layer->bias.copy_(file.tensor("bias"));
  layer->attach_adapter({4, 8.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(1));
  layer->lora_A->weight.copy_(file.tensor("lora_A.weight"));
  layer->lora_B->weight.copy_(file.tensor("lora_B.weight"));
  return layer;
}

double max_relative_error(const torch::Tensor& actual, const torch::Tensor& expected) {
  return ((actual - expected).abs().max() / expected.abs().max()).item<double>();
}

TEST(LoRALinear, WithoutAnAdapterItIsTorchLinearExactly) {
  torch::manual_seed(3);
  torch::nn::Linear plain(torch::nn::LinearOptions(24, 16));
  LoRALinear layer(torch::nn::LinearOptions(24, 16));
  torch::NoGradGuard no_grad;
  layer->weight.copy_(plain->weight);
  layer->bias.copy_(plain->bias);
  const torch::Tensor x = torch::randn({3, 5, 24});
  EXPECT_TRUE(torch::equal(layer(x), plain(x)));
  std::vector<std::string> names;
  for (const auto& item : layer->named_parameters()) names.push_back(item.key());
  EXPECT_EQ(names, (std::vector<std::string>{"weight", "bias"}));
}

// The same float32 ATen operations as peft (the base linear, lora_A, lora_B, the scale, the
// sum); measured here: 6.9e-8 of the output scale, one float32 rounding (2^-24 = 6e-8) apart.
// 1e-6 leaves room for another CPU's matmul blocking; a wrong scale or a missing term is off by
// more than 1e-2.
TEST(LoRALinear, ComputesWhatPeftComputes) {
  const io::SafetensorsFile file = peft_fixture();
  LoRALinear layer = fixture_layer(file);
  torch::NoGradGuard no_grad;
  EXPECT_LT(max_relative_error(layer(file.tensor("input")), file.tensor("output")), 1e-6);
  EXPECT_DOUBLE_EQ(layer->adapter_scale(), 2.0);
}

// Under bf16 autocast both sides round each matmul's inputs and result to bf16 (8-bit
// mantissa, relative step 2^-8 = 3.9e-3); measured here: identical. A result landing on the other
// side of one rounding on another CPU differs by one bf16 step, which 4e-3 allows.
TEST(LoRALinear, ComputesWhatPeftComputesUnderBf16Autocast) {
  const io::SafetensorsFile file = peft_fixture();
  LoRALinear layer = fixture_layer(file);
  torch::NoGradGuard no_grad;
  torch::Tensor output;
  {
    train::AutocastGuard autocast(torch::kCPU, train::Precision::bf16);
    output = layer(file.tensor("input")).to(torch::kFloat);
  }
  EXPECT_LT(max_relative_error(output, file.tensor("output_bf16_autocast")), 4e-3);
}

TEST(LoRALinear, StartsAsPeftsGaussianInitAndChangesNothing) {
  torch::manual_seed(5);
  LoRALinear layer(torch::nn::LinearOptions(512, 256));
  const torch::Tensor x = torch::randn({4, 512});
  torch::NoGradGuard no_grad;
  const torch::Tensor before = layer(x);
  layer->attach_adapter({8, 8.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(9));
  EXPECT_TRUE(torch::equal(layer(x), before));
  EXPECT_TRUE(torch::equal(layer->lora_B->weight, torch::zeros({256, 8})));
  // std 1/r = 0.125 over 4096 draws: the sample std is within 5 % with overwhelming probability.
  EXPECT_NEAR(layer->lora_A->weight.std().item<double>(), 0.125, 0.125 * 0.05);
  EXPECT_EQ(layer->lora_A->weight.scalar_type(), torch::kFloat);
  EXPECT_THROW(layer->attach_adapter({8, 8.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(9)),
               std::logic_error);
}

TEST(LoRALinear, AdapterKeysAreDiffusersLoraKeys) {
  Attention attention(AttentionOptions(32).heads(2).dim_head(16));
  attention->to_q->attach_adapter({4, 4.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(1));
  attention->to_out_0->attach_adapter({4, 4.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(1));
  std::vector<std::string> adapter_keys;
  for (const auto& item : attention->named_parameters()) {
    if (item.key().find("lora_") != std::string::npos) adapter_keys.push_back(item.key());
  }
  EXPECT_EQ(adapter_keys,
            (std::vector<std::string>{"to_q.lora_A.weight", "to_q.lora_B.weight",
                                      "to_out.0.lora_A.weight", "to_out.0.lora_B.weight"}));
}

// A conv adapter: A with the base's kernel, stride and padding, B 1x1, as peft and kohya's LoCon.
TEST(LoRAConv2d, AdapterShapesFollowTheBaseKernelAndStartAtZeroOutput) {
  torch::manual_seed(2);
  LoRAConv2d conv(torch::nn::Conv2dOptions(6, 10, 3).stride(2).padding(1));
  const torch::Tensor x = torch::randn({2, 6, 9, 9});
  torch::NoGradGuard no_grad;
  const torch::Tensor before = conv(x);
  conv->attach_adapter({3, 6.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(4));
  EXPECT_EQ(conv->lora_A->weight.sizes(), (std::vector<int64_t>{3, 6, 3, 3}));
  EXPECT_EQ(conv->lora_B->weight.sizes(), (std::vector<int64_t>{10, 3, 1, 1}));
  EXPECT_TRUE(torch::equal(conv(x), before));
  conv->lora_B->weight.normal_();
  EXPECT_FALSE(torch::allclose(conv(x), before));
  conv->remove_adapter();
  EXPECT_FALSE(conv->has_adapter());
  EXPECT_TRUE(torch::equal(conv(x), before));
  EXPECT_EQ(conv->named_parameters().size(), 2u);  // weight, bias: the base again
}

// Folding W += m·alpha/r·B·A computes what the unfolded adapter computes: the same sums in
// another order, so float32 round-off apart (measured ~1e-7 relative; 1e-5 allows another
// CPU's blocking). A wrong scale or transposition is off by order 1.
TEST(LoRAAdapters, MergedLayersComputeWhatTheAdaptersComputed) {
  torch::manual_seed(8);
  torch::nn::Sequential model(LoRALinear(torch::nn::LinearOptions(12, 7)),
                              LoRAConv2d(torch::nn::Conv2dOptions(7, 5, 3).padding(1)));
  EXPECT_EQ(attach_adapters(*model.ptr(), {"0", "1"}, {2, 5.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(1)), 2);
  EXPECT_THROW(attach_adapters(*model.ptr(), {"2"}, {2, 5.0, 0.0}, at::make_generator<at::CPUGeneratorImpl>(1)),
               std::invalid_argument);
  torch::NoGradGuard no_grad;
  for (auto& [key, value] : adapter_parameters(*model.ptr())) value.normal_();
  set_adapter_multiplier(*model.ptr(), 0.7);
  auto run = [&](const torch::Tensor& x) {
    auto linear = model[0]->as<LoRALinear>();
    auto conv = model[1]->as<LoRAConv2d>();
    return conv->forward(linear->forward(x).permute({0, 3, 1, 2}));
  };
  const torch::Tensor x = torch::randn({2, 4, 4, 12});
  const torch::Tensor adapted = run(x);
  merge_adapters(*model.ptr());
  EXPECT_TRUE(attached_adapters(*model.ptr()).empty());
  const torch::Tensor merged = run(x);
  EXPECT_LT(((merged - adapted).abs().max() / adapted.abs().max()).item<double>(), 1e-5);
}

}  // namespace
}  // namespace sdtrain::models
