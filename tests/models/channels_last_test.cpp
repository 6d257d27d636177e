// The UNet with its convolution weights channels-last (models::to_channels_last,
// compute.channels_last): the same function and gradients as in NCHW, activations that stay
// NHWC, and loads that keep the layout. On the CPU, oneDNN computes both layouts; the GPU
// figures (cuDNN without its transposes) come from bench_group_norm_silu --with-conv.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/group_norm_silu.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "test_support.h"

using namespace sdtrain;

namespace {

const std::filesystem::path& demo_model() {
  static const auto path = sdtrain::testing::source_dir() / "configs" / "demo" / "model";
  return path;
}

bool is_channels_last(const torch::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(torch::MemoryFormat::ChannelsLast);
}

double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / (1 + b.abs().max())).item<double>();
}

struct Pass {
  torch::Tensor out, conv_in_grad, last_conv_grad;
};

// A forward and backward pass of the demo UNet on fixed inputs.
Pass forward_backward(models::UNet2DConditionModel& unet) {
  torch::manual_seed(3);
  const torch::Tensor sample = torch::randn({2, 4, 16, 16});
  const torch::Tensor timestep = torch::tensor({10, 700});
  const torch::Tensor text = torch::randn({2, 77, 32});
  unet->zero_grad();
  torch::Tensor out = unet->forward(sample, timestep, text);
  out.square().mean().backward();
  return {out.detach(), unet->conv_in->weight.grad().clone(),
          unet->conv_out->weight.grad().clone()};
}

}  // namespace

// fp32 on the CPU: the two layouts add in other orders inside oneDNN's convolutions, so the
// results agree to fp32 rounding over the network (1e-5 relative), not bit for bit; a wrong
// layout somewhere (a permutation read as NCHW) differs by O(1).
TEST(ChannelsLast, TheUNetGivesTheSameOutputAndGradients) {
  const io::ModelFolder folder(demo_model());
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused GroupNorm + SiLU" : "torch's GroupNorm + SiLU");
    auto plain = models::load_unet(folder, {});
    auto nhwc = models::load_unet(folder, {});
    models::set_fused_group_norm_silu(*plain, fused);
    models::set_fused_group_norm_silu(*nhwc, fused);
    const int64_t converted = models::to_channels_last(*nhwc);
    EXPECT_GT(converted, 10);
    EXPECT_TRUE(is_channels_last(nhwc->conv_in->weight));
    const Pass want = forward_backward(plain);
    const Pass got = forward_backward(nhwc);
    EXPECT_LE(relative_error(got.out, want.out), 1e-5);
    EXPECT_LE(relative_error(got.conv_in_grad, want.conv_in_grad), 1e-5);
    EXPECT_LE(relative_error(got.last_conv_grad, want.last_conv_grad), 1e-5);
    // The gradient has its weight's layout (autograd's layout contract), so 8-bit AdamW reads
    // both in one storage order without a copy.
    EXPECT_TRUE(is_channels_last(nhwc->conv_in->weight.grad()));
  }
}

// A load into a channels-last module (a resume) keeps the layout the optimizer's states follow.
TEST(ChannelsLast, ALoadKeepsTheLayout) {
  const io::ModelFolder folder(demo_model());
  auto unet = models::load_unet(folder, {});
  models::to_channels_last(*unet);
  const torch::Tensor before = unet->conv_in->weight.detach().clone();
  unet->conv_in->weight.detach().zero_();
  models::load_state_dict(*unet, folder.weights("unet"), {});
  EXPECT_TRUE(is_channels_last(unet->conv_in->weight));
  EXPECT_TRUE(torch::equal(unet->conv_in->weight, before));
  // 2-D and 1-D tensors are left as they are.
  EXPECT_TRUE(unet->time_embedding->linear_1->weight.is_contiguous());
}
