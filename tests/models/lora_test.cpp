// LoRALinear (include/sdtrain/models/lora.h): without an adapter it is torch::nn::Linear to the
// bit; with one it computes what peft's LoraLayer computes (tests/fixtures/lora, written by
// tools/make_lora_fixtures.py with peft 0.21.2); the adapter starts as peft's "gaussian" init
// (B = 0: the output is unchanged) and its keys are diffusers' LoRA keys.
#include "sdtrain/models/lora.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/safetensors.h"
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

}  // namespace
}  // namespace sdtrain::models
