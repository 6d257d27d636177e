// Time per optimizer step over a model's parameter shapes: torch::optim::AdamW (LibTorch),
// sdtrain's AdamW and 8-bit AdamW. Runs on CUDA when available, else on CPU.
//
//   bench_optimizer_step KEYS_FILE [max_parameters] [float32|float16|bfloat16] [steps]
// KEYS_FILE as for bench_optimizer_state. max_parameters keeps only the first tensors up to
// that many parameters (default: all on CUDA, 20M on CPU). Gradients are fixed random tensors;
// each figure is the mean of `steps` timed steps after 3 warm-up steps, with the device
// synchronised around the timed loop only. bitsandbytes cannot be called from C++; to compare,
// run bnb.optim.AdamW8bit over the same shapes in Python with the same loop (docs/optimizer.md).
#include <torch/torch.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "key_list.h"
#include "sdtrain/optim/optimizer.h"
#include "timing.h"

namespace {

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " KEYS_FILE [max_parameters] [dtype] [steps]\n";
    return 1;
  }
  try {
    const torch::Device device = torch::cuda::is_available() ? torch::kCUDA : torch::kCPU;
    const int64_t max_parameters =
        argc > 2 ? std::stoll(argv[2]) : (device.is_cuda() ? INT64_MAX : 20'000'000);
    const std::string dtype_name = argc > 3 ? argv[3] : "float32";
    const torch::ScalarType dtype = dtype_name == "float16"    ? torch::kFloat16
                                    : dtype_name == "bfloat16" ? torch::kBFloat16
                                                               : torch::kFloat32;
    const int steps = argc > 4 ? std::stoi(argv[4]) : 10;

    torch::manual_seed(0);
    sdtrain::optim::NamedParameters params;
    int64_t total = 0;
    for (const auto& shape : read_key_list_shapes(argv[1])) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      if (total + n > max_parameters) break;
      total += n;
      torch::Tensor p = (torch::randn(shape, torch::TensorOptions().device(device)) * 0.02)
                            .to(dtype)
                            .set_requires_grad(true);
      p.mutable_grad() = torch::randn_like(p) * 1e-3;
      params.emplace_back("p" + std::to_string(params.size()), p);
    }
    std::printf("device: %s, dtype: %s, tensors: %zu, parameters: %lld, steps: %d\n",
                device.str().c_str(), dtype_name.c_str(), params.size(),
                static_cast<long long>(total), steps);

    sdtrain::optim::OptimizerOptions options;
    options.lr = 1e-6;  // keep the parameters from drifting over the timed steps
    for (const std::string name : {"adamw", "adamw8bit"}) {
      auto optimizer = sdtrain::optim::make_optimizer(name, params, options);
      const double ms = milliseconds_per_step(device, steps, [&] { optimizer->step(); });
      std::printf("sdtrain %-10s: %9.3f ms/step, state %.3f GiB\n", name.c_str(), ms,
                  optimizer->state_bytes() / (1024.0 * 1024.0 * 1024.0));
    }
    if (dtype == torch::kFloat32) {
      std::vector<torch::Tensor> tensors;
      for (const auto& [name, p] : params) tensors.push_back(p);
      torch::optim::AdamW reference(tensors, torch::optim::AdamWOptions(options.lr));
      const double ms = milliseconds_per_step(device, steps, [&] { reference.step(); });
      std::printf("torch::optim::AdamW : %9.3f ms/step\n", ms);
    }
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
