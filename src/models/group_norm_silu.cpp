#include "sdtrain/models/group_norm_silu.h"

#include "group_norm_silu_cuda.h"

// The formulas. For sample n and group g (M = channels_per_group * hw elements, mean mu, biased
// variance var, r = 1 / sqrt(var + eps)) and channel c of that group:
//   z = x * scale_c + shift_c,  scale_c = r * weight_c,  shift_c = bias_c - mu * scale_c
//   y = silu(z) = z * sigmoid(z)
// Backward, with dz = dy * s * (1 + z * (1 - s)), s = sigmoid(z), and per (n, c) the sums over
// the channel's hw elements ds = sum(dz * x), db = sum(dz):
//   sum1 = sum_c ds * weight_c,  sum2 = sum_c db * weight_c       (over the group's channels)
//   cx = (sum2 * mu - sum1) * r^3 / M,  c1 = -cx * mu - sum2 * r / M
//   dx = dz * scale_c + cx * x + c1
//   grad_weight_c = sum_n (ds - mu * db) * r,  grad_bias_c = sum_n db
// the chain rule through the mean and the variance, in the form of torch's own GroupNorm
// backward (ATen's native/group_norm), with SiLU's derivative applied to dy first. Without the
// SiLU (NormActivation::none): y = z and dz = dy.

namespace sdtrain::models {
namespace {

torch::ScalarType accumulation_type(const torch::Tensor& x) {
  return x.scalar_type() == torch::kDouble ? torch::kDouble : torch::kFloat;
}

void check_shapes(const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias,
                  int64_t groups) {
  TORCH_CHECK(x.dim() >= 2, "fused_group_norm_silu: input must be [N, C, ...], got ", x.sizes());
  TORCH_CHECK(groups > 0 && x.size(1) % groups == 0, "fused_group_norm_silu: ", x.size(1),
              " channels do not split into ", groups, " groups");
  TORCH_CHECK(weight.defined() && bias.defined() && weight.numel() == x.size(1) &&
                  bias.numel() == x.size(1),
              "fused_group_norm_silu: weight and bias must be [", x.size(1), "]");
  // The CUDA kernels would read a host pointer.
  TORCH_CHECK(weight.device() == x.device() && bias.device() == x.device(),
              "fused_group_norm_silu: weight and bias must be on the input's device ", x.device());
}

// Per (n, c) as [N, C, 1]: a group's value repeated over its channels.
torch::Tensor per_channel(const torch::Tensor& per_group, int64_t channels) {
  return per_group.repeat_interleave(channels / per_group.size(1), 1).unsqueeze(-1);
}

// scale and shift of z = x * scale + shift, [N, C, 1] in the accumulation dtype.
std::pair<torch::Tensor, torch::Tensor> affine_map(const torch::Tensor& weight,
                                                   const torch::Tensor& bias,
                                                   const torch::Tensor& mean,
                                                   const torch::Tensor& rstd, int64_t channels) {
  const auto acc = mean.scalar_type();
  torch::Tensor scale = per_channel(rstd, channels) * weight.to(acc).view({1, channels, 1});
  torch::Tensor shift = bias.to(acc).view({1, channels, 1}) - per_channel(mean, channels) * scale;
  return {scale, shift};
}

// The activation's output from z, and the gradient at z from the output's.
torch::Tensor activate(const torch::Tensor& z, NormActivation activation) {
  return activation == NormActivation::silu ? z * torch::sigmoid(z) : z;
}

torch::Tensor activation_backward(const torch::Tensor& dy, const torch::Tensor& z,
                                  NormActivation activation) {
  if (activation == NormActivation::none) return dy;
  const torch::Tensor s = torch::sigmoid(z);
  return dy * s * (1 + z * (1 - s));
}

class GroupNormSiLUFunction : public torch::autograd::Function<GroupNormSiLUFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& weight, const torch::Tensor& bias,
                               int64_t groups, double eps, bool silu) {
    const auto activation = silu ? NormActivation::silu : NormActivation::none;
    auto [y, mean, rstd] =
        detail::group_norm_silu_forward(x, weight, bias, groups, eps, activation);
    ctx->save_for_backward({x, weight, bias, mean, rstd});
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["silu"] = silu;
    return y;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool affine = ctx->needs_input_grad(1) || ctx->needs_input_grad(2);
    const auto activation =
        ctx->saved_data["silu"].toBool() ? NormActivation::silu : NormActivation::none;
    auto [dx, grad_weight, grad_bias] =
        detail::group_norm_silu_backward(grads[0], saved[0], saved[1], saved[2], saved[3], saved[4],
                                         ctx->saved_data["groups"].toInt(), activation, affine);
    return {ctx->needs_input_grad(0) ? dx : torch::Tensor(),
            ctx->needs_input_grad(1) ? grad_weight : torch::Tensor(),
            ctx->needs_input_grad(2) ? grad_bias : torch::Tensor(),
            torch::Tensor(),
            torch::Tensor(),
            torch::Tensor()};
  }
};

}  // namespace

namespace detail {

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward_reference(
    const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, int64_t groups,
    double eps, NormActivation activation) {
  const int64_t n = x.size(0), channels = x.size(1);
  const torch::Tensor grouped = x.to(accumulation_type(x)).reshape({n, groups, -1});
  torch::Tensor mean = grouped.mean(-1);
  torch::Tensor rstd = (grouped.var(-1, /*unbiased=*/false) + eps).rsqrt();
  const auto [scale, shift] = affine_map(weight, bias, mean, rstd, channels);
  const torch::Tensor z = grouped.reshape({n, channels, -1}) * scale + shift;
  // In x's layout, as the CUDA kernels write it (channels-last stays channels-last).
  torch::Tensor y = activate(z, activation)
                        .to(x.scalar_type())
                        .reshape(x.sizes())
                        .contiguous(x.suggest_memory_format());
  return {y, mean, rstd};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward_reference(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
    const torch::Tensor& bias, const torch::Tensor& mean, const torch::Tensor& rstd, int64_t groups,
    NormActivation activation, bool affine_grads) {
  const int64_t n = x.size(0), channels = x.size(1);
  const auto acc = mean.scalar_type();
  const torch::Tensor xa = x.to(acc).reshape({n, channels, -1});
  const auto [scale, shift] = affine_map(weight, bias, mean, rstd, channels);
  const torch::Tensor z = xa * scale + shift;
  const torch::Tensor dz =
      activation_backward(dy.to(acc).reshape({n, channels, -1}), z, activation);
  const torch::Tensor ds = (dz * xa).sum(-1), db = dz.sum(-1);  // [N, C]
  const torch::Tensor w = weight.to(acc).view({1, channels});
  const torch::Tensor sum1 = (ds * w).reshape({n, groups, -1}).sum(-1);
  const torch::Tensor sum2 = (db * w).reshape({n, groups, -1}).sum(-1);
  const double count = static_cast<double>(xa.size(2) * (channels / groups));
  const torch::Tensor cx = (sum2 * mean - sum1) * rstd.pow(3) / count;
  const torch::Tensor c1 = -cx * mean - sum2 * rstd / count;
  torch::Tensor dx = dz * scale + per_channel(cx, channels) * xa + per_channel(c1, channels);
  dx = dx.to(x.scalar_type()).reshape(x.sizes()).contiguous(x.suggest_memory_format());
  if (!affine_grads) return {dx, {}, {}};
  const torch::Tensor mean_c = per_channel(mean, channels).squeeze(-1);
  const torch::Tensor rstd_c = per_channel(rstd, channels).squeeze(-1);
  return {dx, ((ds - mean_c * db) * rstd_c).sum(0).to(weight.scalar_type()),
          db.sum(0).to(bias.scalar_type())};
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_forward(
    const torch::Tensor& x, const torch::Tensor& weight, const torch::Tensor& bias, int64_t groups,
    double eps, NormActivation activation) {
  check_shapes(x, weight, bias, groups);
  if (group_norm_silu_on_cuda(x)) {
    return group_norm_silu_forward_cuda(x, weight, bias, groups, eps, activation);
  }
  return group_norm_silu_forward_reference(x, weight, bias, groups, eps, activation);
}

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> group_norm_silu_backward(
    const torch::Tensor& dy, const torch::Tensor& x, const torch::Tensor& weight,
    const torch::Tensor& bias, const torch::Tensor& mean, const torch::Tensor& rstd, int64_t groups,
    NormActivation activation, bool affine_grads) {
  if (group_norm_silu_on_cuda(x)) {
    return group_norm_silu_backward_cuda(dy, x, weight, bias, mean, rstd, groups, activation,
                                         affine_grads);
  }
  return group_norm_silu_backward_reference(dy, x, weight, bias, mean, rstd, groups, activation,
                                            affine_grads);
}

}  // namespace detail

torch::Tensor fused_group_norm_silu(const torch::Tensor& x, const torch::Tensor& weight,
                                    const torch::Tensor& bias, int64_t groups, double eps) {
  return GroupNormSiLUFunction::apply(x, weight, bias, groups, eps, /*silu=*/true);
}

torch::Tensor fused_group_norm(const torch::Tensor& x, const torch::Tensor& weight,
                               const torch::Tensor& bias, int64_t groups, double eps) {
  return GroupNormSiLUFunction::apply(x, weight, bias, groups, eps, /*silu=*/false);
}

torch::Tensor FusedGroupNormImpl::forward(const torch::Tensor& x) {
  const bool silu = activation() == NormActivation::silu;
  // The fused node has an affine transform; a GroupNorm without one runs torch's operations.
  if (fused && options.affine()) {
    return GroupNormSiLUFunction::apply(x, weight, bias, options.num_groups(), options.eps(), silu);
  }
  const torch::Tensor y = torch::nn::GroupNormImpl::forward(x);
  return silu ? torch::silu(y) : y;
}

int64_t set_fused_group_norm_silu(torch::nn::Module& module, bool fused) {
  int64_t count = 0;
  for (const auto& child : module.modules(/*include_self=*/true)) {
    if (auto norm = std::dynamic_pointer_cast<FusedGroupNormImpl>(child)) {
      norm->fused = fused;
      ++count;
    }
  }
  return count;
}

}  // namespace sdtrain::models
