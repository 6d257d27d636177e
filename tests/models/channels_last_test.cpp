// The UNet and VAE with their convolution weights channels-last (models::to_channels_last,
// compute.channels_last): the same function and gradients as in NCHW, activations that stay
// NHWC from one convolution to the next (watched at every convolution through torch's
// RecordFunction callbacks), and loads that keep the layout. On the CPU, oneDNN computes both
// layouts; the GPU figures (cuDNN without its transposes) come from
// bench_group_norm_silu --with-conv and the benchmark row today-cl.

#include <ATen/record_function.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <mutex>
#include <string_view>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/autoencoder_kl.h"
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

using models::is_channels_last;

double relative_error(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b).abs().max() / (1 + b.abs().max())).item<double>();
}

// In NCHW order: what a convolution with a channels-last weight transposes. By the order of
// the strides, as torch's convolutions choose (a slice of a channels-last tensor, as the skip
// concatenation's backward gives, is channels-last too; a tensor that is both is not NCHW).
bool is_nchw_only(const c10::IValue& value) {
  if (!value.isTensor()) return false;
  const torch::Tensor& t = value.toTensor();
  return t.dim() == 4 && t.suggest_memory_format() != torch::MemoryFormat::ChannelsLast;
}

// Watches every convolution dispatched while it lives (forward and backward, any thread) and
// counts those that got an activation in NCHW: the convolution then transposes it (cuDNN
// computes in NHWC on the GPU), which is what channels-last is meant to avoid. Counts torch's
// GroupNorms too: on the CPU they keep the layout, but ATen's CUDA kernel makes its input NCHW.
class ConvolutionLayoutProbe {
 public:
  ConvolutionLayoutProbe()
      : handle_(at::addGlobalCallback(
            at::RecordFunctionCallback(&ConvolutionLayoutProbe::observe).needsInputs(true))) {
    instance() = this;
  }
  ~ConvolutionLayoutProbe() {
    at::removeCallback(handle_);
    instance() = nullptr;
  }
  ConvolutionLayoutProbe(const ConvolutionLayoutProbe&) = delete;
  ConvolutionLayoutProbe& operator=(const ConvolutionLayoutProbe&) = delete;

  int64_t forwards = 0, backwards = 0;      // convolutions seen
  int64_t nchw_inputs = 0, nchw_grads = 0;  // of them, with an NCHW input / output gradient
  int64_t torch_group_norms = 0;            // aten::native_group_norm, forward
  // The convolution whose output gradient is the loss's, not counted: mse_loss's backward takes
  // the layout of the target (the NCHW noise), and transposing the 4-channel gradient once
  // costs less than a copy of the target would.
  torch::Tensor loss_side_weight;

 private:
  static ConvolutionLayoutProbe*& instance() {
    static ConvolutionLayoutProbe* probe = nullptr;
    return probe;
  }
  static std::unique_ptr<at::ObserverContext> observe(const at::RecordFunction& fn) {
    ConvolutionLayoutProbe* probe = instance();
    if (probe == nullptr) return nullptr;
    const std::string_view name = fn.name();
    const auto inputs = fn.inputs();
    static std::mutex mutex;  // backward may run on autograd's worker threads
    const std::lock_guard<std::mutex> lock(mutex);
    if (name == "aten::native_group_norm") ++probe->torch_group_norms;
    if (name == "aten::convolution" && !inputs.empty()) {
      ++probe->forwards;
      probe->nchw_inputs += is_nchw_only(inputs[0]);
    } else if (name == "aten::convolution_backward" && inputs.size() >= 2) {
      ++probe->backwards;
      const bool from_the_loss = inputs.size() >= 3 && inputs[2].isTensor() &&
                                 inputs[2].toTensor().is_same(probe->loss_side_weight);
      probe->nchw_grads += is_nchw_only(inputs[0]) && !from_the_loss;
      probe->nchw_inputs += is_nchw_only(inputs[1]);
    }
    return nullptr;
  }

  at::CallbackHandle handle_;
};

struct Pass {
  torch::Tensor out, conv_in_grad, last_conv_grad;
};

// A forward and backward pass of the demo UNet on fixed inputs.
Pass forward_backward(models::UNet2DConditionModel& unet,
                      torch::MemoryFormat sample_format = torch::MemoryFormat::Contiguous) {
  torch::manual_seed(3);
  const torch::Tensor sample = torch::randn({2, 4, 16, 16}).contiguous(sample_format);
  const torch::Tensor timestep = torch::tensor({10, 700});
  const torch::Tensor text = torch::randn({2, 77, 32});
  unet->zero_grad();
  const torch::Tensor target = torch::randn({2, 4, 16, 16});  // the noise: NCHW, as the trainer's
  torch::Tensor out = unet->forward(sample, timestep, text);
  torch::mse_loss(out, target).backward();  // the trainer's loss (src/train/diffusion_loss.cpp)
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

// Channels-last is only worth its conversions where the activations stay NHWC from one
// convolution to the next: an NCHW tensor reaching a convolution with an NHWC weight is
// transposed there (and on a GPU once more back). Every module between the convolutions keeps
// its input's layout: the resnets' residual additions, the samplers, the skip concatenations,
// and the attention blocks, whose token view returns to [B, C, H, W] in the layout of the
// block's input (src/models/transformer_2d.cpp). Given channels-last latents, no convolution of
// the forward or backward pass sees an NCHW activation or gradient.
TEST(ChannelsLast, NoConvolutionSeesAnNchwActivation) {
  const io::ModelFolder folder(demo_model());
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused GroupNorm + SiLU" : "torch's GroupNorm + SiLU");
    auto unet = models::load_unet(folder, {});
    models::set_fused_group_norm_silu(*unet, fused);
    models::to_channels_last(*unet);
    ConvolutionLayoutProbe probe;
    probe.loss_side_weight = unet->conv_out->weight;
    forward_backward(unet, torch::MemoryFormat::ChannelsLast);
    EXPECT_GT(probe.forwards, 20);
    EXPECT_GT(probe.backwards, 20);
    EXPECT_EQ(probe.nchw_inputs, 0);
    EXPECT_EQ(probe.nchw_grads, 0);
    // Fused, every GroupNorm of the UNet runs the fused node (the resnets' with their SiLU, the
    // attention blocks' alone), whose channels-last kernels keep the layout on the GPU too.
    if (fused)
      EXPECT_EQ(probe.torch_group_norms, 0);
    else
      EXPECT_GT(probe.torch_group_norms, 0);
  }
}

// Without the option nothing changes layout: every convolution runs in NCHW, as before.
TEST(ChannelsLast, NchwWeightsKeepEveryActivationNchw) {
  const io::ModelFolder folder(demo_model());
  auto unet = models::load_unet(folder, {});
  ConvolutionLayoutProbe probe;
  forward_backward(unet);
  EXPECT_GT(probe.forwards, 20);
  EXPECT_EQ(probe.nchw_inputs, probe.forwards + probe.backwards);
  EXPECT_EQ(probe.nchw_grads, probe.backwards);
}

// The VAE, which encodes every step's images unless latents are cached and decodes every
// sampled image, converted the same way: every convolution of an encode and a decode sees its
// activation channels-last, and the latents and images equal NCHW's (1e-5 relative, as above).
TEST(ChannelsLast, TheVaeKeepsTheLayoutAndItsResults) {
  const io::ModelFolder folder(demo_model());
  torch::NoGradGuard no_grad;
  torch::manual_seed(5);
  const torch::Tensor pixels = torch::rand({2, 3, 32, 32}) * 2 - 1;
  for (const bool fused : {false, true}) {
    SCOPED_TRACE(fused ? "fused GroupNorm + SiLU" : "torch's GroupNorm + SiLU");
    auto plain = models::load_vae(folder, {});
    auto nhwc = models::load_vae(folder, {});
    models::set_fused_group_norm_silu(*plain, fused);
    models::set_fused_group_norm_silu(*nhwc, fused);
    EXPECT_GT(models::to_channels_last(*nhwc), 10);
    const torch::Tensor want_latents = plain->encode(pixels).mode();
    const torch::Tensor want_images = plain->decode(want_latents);
    ConvolutionLayoutProbe probe;
    const torch::Tensor latents =
        nhwc->encode(pixels.contiguous(torch::MemoryFormat::ChannelsLast)).mode();
    const torch::Tensor images =
        nhwc->decode(latents.contiguous(torch::MemoryFormat::ChannelsLast));
    EXPECT_GT(probe.forwards, 20);
    EXPECT_EQ(probe.nchw_inputs, 0);
    EXPECT_LE(relative_error(latents, want_latents), 1e-5);
    EXPECT_LE(relative_error(images, want_images), 1e-5);
  }
}
