#pragma once
// A small model and its update policy for the update tests (fused_update_test.cpp,
// sync_free_update_test.cpp): one step is a forward pass, a scaled backward pass, apply and
// settle, as the trainer drives them (include/sdtrain/train/update.h).

#include <torch/torch.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/optim/optimizer.h"
#include "sdtrain/train/update.h"

namespace sdtrain::train {

// Two independent branches, so one can overflow while the other stays finite. The first layer
// of each has 8192 weights: over adamw8bit's min_8bit_size, so the quantized path runs too.
struct TwoBranchesImpl : torch::nn::Module {
  TwoBranchesImpl() {
    a1 = register_module("a1", torch::nn::Linear(64, 128));
    a2 = register_module("a2", torch::nn::Linear(128, 8));
    b1 = register_module("b1", torch::nn::Linear(64, 128));
  }
  torch::Tensor forward(const torch::Tensor& x, double b_factor = 1.0) {
    const torch::Tensor a = a2(torch::gelu(a1(x)));
    const torch::Tensor b = b1(x * b_factor);
    return a.pow(2).mean() + b.pow(2).mean();
  }
  torch::nn::Linear a1{nullptr}, a2{nullptr}, b1{nullptr};
};
TORCH_MODULE(TwoBranches);

struct ToyRun {
  TwoBranches model;
  torch::Device device;
  std::optional<TrainedSet> trained;
  LossScaler scaler;
  std::optional<EMAModel> ema;
  std::unique_ptr<UpdatePolicy> update;

  ToyRun(const std::string& optimizer, bool fused, bool loss_scaling, double max_grad_norm = 0,
         torch::Device on = torch::kCPU, bool use_ema = false)
      : model(make_model(on)), device(on), scaler(loss_scaling, on) {
    trained.emplace(
        std::vector<PipelineModule>{{"unet", "diffusion_pytorch_model", model.ptr(), {}}},
        std::vector<std::string>{"unet"});
    if (use_ema) ema.emplace(trained->component_parameters("unet"), EMAOptions{0.5});
    optim::OptimizerOptions options;
    options.lr = 1e-2;
    UpdateOptions update_options;
    update_options.max_grad_norm = max_grad_norm;
    update_options.lr.learning_rate = options.lr;
    update = make_update_policy(
        fused, *trained, optim::make_optimizer(optimizer, trained->named_parameters(), options),
        scaler, ema ? &*ema : nullptr, update_options);
  }
  static TwoBranches make_model(torch::Device on) {
    torch::manual_seed(3);
    TwoBranches model;
    model->to(on);
    return model;
  }
  // The forward and backward passes of step `step`; `b_factor` multiplies branch b's input
  // (inf: its gradient overflows).
  void backward(int64_t step, double b_factor = 1.0) {
    torch::manual_seed(100 + step);
    const torch::Tensor x = torch::randn({4, 64}).to(device);
    update->begin_step(step);
    scaler.scale(model->forward(x, b_factor)).backward();
  }
  // One whole step: backward, apply, settle.
  UpdateResult step(int64_t step, double b_factor = 1.0) {
    backward(step, b_factor);
    update->apply(step);
    return *update->settle();
  }
  std::vector<torch::Tensor> weights() const {
    std::vector<torch::Tensor> copies;
    for (const auto& parameter : trained->parameters()) copies.push_back(parameter.clone());
    return copies;
  }
};

}  // namespace sdtrain::train
