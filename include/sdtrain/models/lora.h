#pragma once
// Layers that can carry a LoRA adapter (Hu et al. 2021, "LoRA: Low-Rank Adaptation"), computed as
// peft's LoraLayer does for nn.Linear and nn.Conv2d, which diffusers' train_dreambooth_lora.py
// trains:
//   y = base(x) + m · (alpha / r) · B(A(dropout(x)))
// Linear: A = Linear(in, r), B = Linear(r, out). Conv2d: A = Conv2d(in, r) with the base's
// kernel, stride and padding, B = Conv2d(r, out, 1x1) (kohya's LoCon has the same shapes).
// m is the multiplier a user gives at inference (`generate --lora FILE:SCALE`), 1 in training.
// Without an adapter each layer is its torch::nn counterpart exactly: the same parameters under
// the same names ("weight", "bias") and the same forward, so strict base loading and parity are
// unchanged. attach_adapter() adds lora_A / lora_B as members, so their keys are
// "<layer>.lora_A.weight" and "<layer>.lora_B.weight", the layout of diffusers' LoRA files.

#include <torch/torch.h>

#include <utility>

namespace sdtrain::models {

struct LoRAOptions {
  int64_t rank = 4;    // diffusers' default
  double alpha = 4.0;  // diffusers sets lora_alpha = rank: a scale of 1
  double dropout = 0.0;
};

// What every adapter-capable layer offers, whatever its base type: the seam the adapter walkers
// (lora_adapters.h) use.
class LoRAHost {
 public:
  virtual ~LoRAHost() = default;
  // Adds an adapter initialised as train_dreambooth_lora.py does (peft's "gaussian"): A drawn
  // from a normal distribution with standard deviation 1/r, B = 0, so the output is unchanged
  // until B trains. The adapter is float32 (it is trained) on the base weight's device.
  // Throws std::logic_error when one is attached already.
  virtual void attach_adapter(const LoRAOptions& options, at::Generator generator) = 0;
  // Unregisters lora_A / lora_B: the layer is its base again (adapters swapped between jobs).
  virtual void remove_adapter() = 0;
  virtual bool has_adapter() const = 0;
  virtual torch::nn::Module& adapter_A() = 0;
  virtual torch::nn::Module& adapter_B() = 0;
  virtual const LoRAOptions& adapter_options() const = 0;
  // m above; 1 unless a user scales the adapter at inference.
  virtual void set_adapter_multiplier(double multiplier) = 0;
  // alpha / r · m.
  virtual double adapter_scale() const = 0;
};

// The adapter's settings, shared by both layer kinds.
class LoRAState {
 public:
  void set(const LoRAOptions& options) {
    options_ = options;
    multiplier_ = 1.0;
  }
  const LoRAOptions& options() const { return options_; }
  void set_multiplier(double multiplier) { multiplier_ = multiplier; }
  double scale() const { return options_.alpha / static_cast<double>(options_.rank) * multiplier_; }
  // dropout(x) in the adapter's dtype, as peft computes the adapter branch.
  torch::Tensor adapter_input(const torch::Tensor& x, c10::ScalarType dtype, bool training) const;

 private:
  LoRAOptions options_;
  double multiplier_ = 1.0;
};

namespace lora_detail {
// Throws std::logic_error when an adapter is attached already or the rank is not positive.
void check_new_adapter(bool attached, const LoRAOptions& options);
// peft's init_lora_weights="gaussian": A ~ N(0, 1/r) drawn on the CPU from `generator` (so the
// values do not depend on the device), B = 0; both float32 on `device`.
void gaussian_init(torch::Tensor& a, torch::Tensor& b, torch::Device device, int64_t rank,
                   at::Generator generator);
}  // namespace lora_detail

// What both layer kinds share: Base is the torch layer (LinearImpl, Conv2dImpl), Holder the
// module type of lora_A and lora_B (Linear, Conv2d). The kinds differ only in A's and B's shapes.
template <typename Base, typename Holder>
class LoRALayerImpl : public Base, public LoRAHost {
 public:
  using Base::Base;

  void remove_adapter() override {
    if (!has_adapter()) return;
    this->unregister_module("lora_A");
    this->unregister_module("lora_B");
    lora_A = nullptr;
    lora_B = nullptr;
  }
  bool has_adapter() const override { return !lora_A.is_empty(); }
  torch::nn::Module& adapter_A() override { return *lora_A; }
  torch::nn::Module& adapter_B() override { return *lora_B; }
  const LoRAOptions& adapter_options() const override { return state_.options(); }
  void set_adapter_multiplier(double multiplier) override { state_.set_multiplier(multiplier); }
  double adapter_scale() const override { return state_.scale(); }

  torch::Tensor forward(const torch::Tensor& input) {
    torch::Tensor result = Base::forward(input);
    if (!has_adapter()) return result;
    // As peft: the input in the adapter's dtype, the sum back in the base result's dtype
    // (under autocast both sides compute in the autocast dtype anyway).
    const torch::Tensor x =
        state_.adapter_input(input, lora_A->weight.scalar_type(), this->is_training());
    return (result + lora_B(lora_A(x)) * state_.scale()).to(result.scalar_type());
  }

  Holder lora_A{nullptr};
  Holder lora_B{nullptr};

 protected:
  // Registers `a` and `b` as lora_A and lora_B, initialised as peft's "gaussian".
  void add_adapter(Holder a, Holder b, const LoRAOptions& options, at::Generator generator) {
    lora_A = this->register_module("lora_A", std::move(a));
    lora_B = this->register_module("lora_B", std::move(b));
    lora_detail::gaussian_init(lora_A->weight, lora_B->weight, this->weight.device(), options.rank,
                               generator);
    state_.set(options);
  }

 private:
  LoRAState state_;
};

class LoRALinearImpl : public LoRALayerImpl<torch::nn::LinearImpl, torch::nn::Linear> {
 public:
  explicit LoRALinearImpl(const torch::nn::LinearOptions& options) : LoRALayerImpl(options) {}
  // A = Linear(in, r), B = Linear(r, out), no biases.
  void attach_adapter(const LoRAOptions& options, at::Generator generator) override;
};
TORCH_MODULE(LoRALinear);

class LoRAConv2dImpl : public LoRALayerImpl<torch::nn::Conv2dImpl, torch::nn::Conv2d> {
 public:
  explicit LoRAConv2dImpl(const torch::nn::Conv2dOptions& options) : LoRALayerImpl(options) {}
  // A = Conv2d(in, r) with the base's kernel, stride and padding; B = Conv2d(r, out, 1x1).
  void attach_adapter(const LoRAOptions& options, at::Generator generator) override;
};
TORCH_MODULE(LoRAConv2d);

}  // namespace sdtrain::models
