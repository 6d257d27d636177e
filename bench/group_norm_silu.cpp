// GroupNorm + SiLU of SD 2.1-base's UNet, torch's two operations against the fused node
// (include/sdtrain/models/group_norm_silu.h): time of one forward and one forward + backward over
// all 45 pairs, and the memory the pairs keep for backward. Under fp16 autocast with fp32
// weights on CUDA, as the training step runs them; fp32 on the CPU (a smoke run: the CPU path of
// the fused node is its reference, not a fast kernel).
//
//   bench_group_norm_silu [--batch 2] [--latent 64] [--repeat 20] [--with-conv]
//
// --with-conv puts each pair's convolution after it (the resnet's conv1 or conv2, 3x3; conv_out
// after conv_norm_out) and adds a third path, fused in channels-last: weights and activations
// NHWC, which cuDNN computes in without the NCHW<->NHWC transposes the profile found
// (docs/benchmarks.md), and the fused node's NHWC kernels. It measures whether channels-last
// pays before the trainer converts its models.
//
// Prints one JSON line per path. The torch path includes the cast of SiLU's fp32 output to fp16
// that the next convolution performs under autocast, so both paths end with what the
// convolution reads. Each figure is the mean of `repeat` timed rounds after 3 untimed ones, the
// device synchronised around the timed loop only.

#include <torch/torch.h>

#include <CLI/CLI.hpp>
#include <iostream>
#include <nlohmann/json.hpp>
#include <vector>

#include "bench_main.h"
#include "sdtrain/models/group_norm_silu.h"
#include "sdtrain/train/device_memory.h"
#include "sdtrain/train/mixed_precision.h"
#include "timing.h"

namespace {

using namespace sdtrain;

struct Pair {
  int64_t channels;
  int64_t conv_out;  // output channels of the convolution after the pair
  int64_t down;      // the latent side divided by this
};

// The input of each GroupNorm + SiLU of SD 2.1-base's UNet (block_out_channels 320, 640, 1280,
// 1280; two resnets per down block, three per up block, whose first norm reads the
// concatenated skip), in forward order: 44 resnet norms and conv_norm_out.
std::vector<Pair> sd21_unet_pairs() {
  std::vector<Pair> pairs;
  auto resnet = [&](int64_t in, int64_t out, int64_t down) {
    pairs.push_back({in, out, down});   // norm1 -> conv1
    pairs.push_back({out, out, down});  // norm2 -> conv2
  };
  resnet(320, 320, 1), resnet(320, 320, 1);      // down 0
  resnet(320, 640, 2), resnet(640, 640, 2);      // down 1
  resnet(640, 1280, 4), resnet(1280, 1280, 4);   // down 2
  resnet(1280, 1280, 8), resnet(1280, 1280, 8);  // down 3
  resnet(1280, 1280, 8), resnet(1280, 1280, 8);  // mid
  for (int64_t in : {2560, 2560, 2560}) resnet(in, 1280, 8);  // up 0
  for (int64_t in : {2560, 2560, 1920}) resnet(in, 1280, 4);  // up 1
  for (int64_t in : {1920, 1280, 960}) resnet(in, 640, 2);    // up 2
  for (int64_t in : {960, 640, 640}) resnet(in, 320, 1);      // up 3
  pairs.push_back({320, 4, 1});                               // conv_norm_out -> conv_out
  return pairs;
}

struct Tensors {
  torch::Tensor x, weight, bias, dy;
  torch::Tensor conv_weight, conv_dy;  // with --with-conv
};

enum class Path { torch, fused, fused_channels_last };

const char* path_name(Path path) {
  switch (path) {
    case Path::torch: return "torch";
    case Path::fused: return "fused";
    case Path::fused_channels_last: return "fused-channels-last";
  }
  return "";
}

// The pairs' tensors in NHWC (weights included), as leaves like the NCHW ones.
std::vector<Tensors> channels_last(const std::vector<Tensors>& pairs) {
  const auto nhwc = [](const torch::Tensor& t) {
    return t.defined() && t.dim() == 4
               ? t.detach().contiguous(torch::MemoryFormat::ChannelsLast).requires_grad_(t.requires_grad())
               : t;
  };
  std::vector<Tensors> out;
  for (const Tensors& p : pairs)
    out.push_back({nhwc(p.x), p.weight, p.bias, nhwc(p.dy), nhwc(p.conv_weight), nhwc(p.conv_dy)});
  return out;
}

// Runs every pair's forward, and its convolution's when it has one (and backward, if
// `backward`); returns the outputs.
std::vector<torch::Tensor> run_pairs(const std::vector<Tensors>& pairs, Path path,
                                     torch::ScalarType activation, bool backward) {
  std::vector<torch::Tensor> outputs;
  for (const auto& p : pairs) {
    torch::Tensor y = path != Path::torch
                          ? models::fused_group_norm_silu(p.x, p.weight, p.bias, 32, 1e-5)
                          : torch::silu(torch::group_norm(p.x, 32, p.weight, p.bias, 1e-5))
                                .to(activation);
    if (p.conv_weight.defined()) y = torch::conv2d(y, p.conv_weight, {}, 1, 1);
    if (backward) y.backward(p.conv_weight.defined() ? p.conv_dy : p.dy);
    outputs.push_back(y);
  }
  return outputs;
}

int run(int argc, char** argv) {
  CLI::App app{"GroupNorm + SiLU of SD 2.1-base's UNet: torch against the fused node"};
  int64_t batch = 2, latent = 64;
  int repeat = 20;
  bool with_conv = false;
  app.add_option("--batch", batch, "samples (2: batch 1 + prior preservation)");
  app.add_flag("--with-conv", with_conv,
               "each pair's convolution after it, and the channels-last path");
  app.add_option("--latent", latent, "latent side (64 for 512x512)");
  app.add_option("--repeat", repeat, "timed rounds")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);

  const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
  const auto activation = device.is_cuda() ? torch::kHalf : torch::kFloat;
  torch::manual_seed(0);
  std::vector<Tensors> pairs;
  for (const Pair& pair : sd21_unet_pairs()) {
    const int64_t side = latent / pair.down;
    const std::vector<int64_t> shape{batch, pair.channels, side, side};
    Tensors p{torch::randn(shape, torch::dtype(activation).device(device)).requires_grad_(),
              torch::ones({pair.channels}, torch::device(device)).requires_grad_(),
              torch::zeros({pair.channels}, torch::device(device)).requires_grad_(),
              torch::randn(shape, torch::dtype(activation).device(device))};
    if (with_conv) {
      // fp32 weights, cast by autocast as in training.
      p.conv_weight = (0.02 * torch::randn({pair.conv_out, pair.channels, 3, 3},
                                           torch::device(device)))
                          .requires_grad_();
      p.conv_dy = torch::randn({batch, pair.conv_out, side, side},
                               torch::dtype(activation).device(device));
    }
    pairs.push_back(p);
  }
  std::vector<std::pair<Path, std::vector<Tensors>>> paths{{Path::torch, pairs},
                                                           {Path::fused, pairs}};
  if (with_conv) paths.emplace_back(Path::fused_channels_last, channels_last(pairs));
  train::AutocastGuard autocast(device.type(),
                                device.is_cuda() ? train::Precision::fp16 : train::Precision::fp32);
  for (const auto& [path, tensors] : paths) {
    const double forward_ms = milliseconds_per_step(device, repeat, [&] {
      torch::NoGradGuard no_grad;
      run_pairs(tensors, path, activation, false);
    });
    const double step_ms = milliseconds_per_step(
        device, repeat, [&] { run_pairs(tensors, path, activation, true); });
    // What the pairs keep for backward: memory held after a forward with the graph alive, less
    // the outputs themselves (the next convolution keeps those either way).
    synchronize(device);
    const int64_t before = train::current_device_memory_bytes(device);
    int64_t kept = 0;
    {
      const auto outputs = run_pairs(tensors, path, activation, false);
      for (const auto& y : outputs) kept -= y.numel() * y.element_size();
      kept += train::current_device_memory_bytes(device) - before;
    }
    nlohmann::json report = {{"path", path_name(path)},
                             {"with_conv", with_conv},
                             {"device", device.str()},
                             {"pairs", pairs.size()},
                             {"batch", batch},
                             {"latent", latent},
                             {"ms_forward", forward_ms},
                             {"ms_forward_backward", step_ms},
                             {"kept_for_backward_mib", nullptr}};
    if (device.is_cuda()) report["kept_for_backward_mib"] = kept / 1048576.0;  // CUDA only
    std::cout << report.dump() << std::endl;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  return run_reporting_errors("bench_group_norm_silu", [&] { return run(argc, argv); });
}
