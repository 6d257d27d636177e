#include "sdtrain/train/gradient_hooks.h"

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

namespace sdtrain::train {

namespace {

class CallOnGradient final : public torch::autograd::PostAccumulateGradHook {
 public:
  explicit CallOnGradient(std::function<void()> on_ready) : on_ready_(std::move(on_ready)) {}
  void operator()(const torch::autograd::Variable&) override { on_ready_(); }

 private:
  std::function<void()> on_ready_;
};

}  // namespace

void set_post_accumulate_grad_hook(const torch::Tensor& parameter, std::function<void()> on_ready) {
  torch::autograd::impl::set_post_acc_grad_hooks(
      parameter, on_ready ? std::make_unique<CallOnGradient>(std::move(on_ready)) : nullptr);
}

}  // namespace sdtrain::train
