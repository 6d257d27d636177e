#include "sdtrain/models/attention_backend.h"

#include <ATen/Context.h>
#include <ATen/SDPBackend.h>

#include <algorithm>
#include <atomic>
#include <mutex>

namespace sdtrain::models {
namespace {

// The preference in force, for the record of each call (PreferredAttentionBackend sets it;
// the calls may come from another thread than the one that set it).
std::atomic<AttentionBackend> current_preference{AttentionBackend::automatic};

struct KernelRecord {
  std::mutex mutex;
  std::vector<AttentionKernelUse> seen;
};

KernelRecord& kernel_record() {
  static KernelRecord record;
  return record;
}

at::SDPBackend torch_backend(AttentionBackend backend) {
  switch (backend) {
    case AttentionBackend::flash:
      return at::SDPBackend::flash_attention;
    case AttentionBackend::efficient:
      return at::SDPBackend::efficient_attention;
    case AttentionBackend::cudnn:
      return at::SDPBackend::cudnn_attention;
    case AttentionBackend::math:
    case AttentionBackend::automatic:
      break;
  }
  return at::SDPBackend::math;
}

// The config's name of the kernel torch chose; "overrideable" is a third-party backend's slot.
std::string kernel_name(int64_t choice) {
  switch (static_cast<at::SDPBackend>(choice)) {
    case at::SDPBackend::flash_attention:
      return "flash";
    case at::SDPBackend::efficient_attention:
      return "efficient";
    case at::SDPBackend::cudnn_attention:
      return "cudnn";
    case at::SDPBackend::math:
      return "math";
    default:
      return "overrideable";
  }
}

std::string precision_name(c10::ScalarType dtype) {
  switch (dtype) {
    case torch::kHalf:
      return "fp16";
    case torch::kBFloat16:
      return "bf16";
    case torch::kFloat:
      return "fp32";
    default:
      return c10::toString(dtype);
  }
}

bool same_kind(const AttentionKernelUse& a, const AttentionKernelUse& b) {
  return a.device == b.device && a.dtype == b.dtype && a.head_size == b.head_size &&
         a.causal == b.causal && a.with_gradients == b.with_gradients && a.preferred == b.preferred;
}

void note_kernel(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                 bool is_causal) {
  AttentionKernelUse use;
  use.device = q.device().type();
  use.dtype = q.scalar_type();
  use.head_size = q.size(-1);
  use.causal = is_causal;
  use.with_gradients = torch::GradMode::is_enabled() &&
                       (q.requires_grad() || k.requires_grad() || v.requires_grad());
  use.preferred = current_preference.load();
  KernelRecord& record = kernel_record();
  std::lock_guard<std::mutex> lock(record.mutex);
  const auto known = [&](const AttentionKernelUse& seen) { return same_kind(seen, use); };
  if (std::any_of(record.seen.begin(), record.seen.end(), known)) return;
  // Host-side checks only (no device work, nothing queued): safe inside a graph capture.
  use.kernel = kernel_name(
      at::_fused_sdp_choice(q, k, v, std::nullopt, 0.0, is_causal, std::nullopt, false));
  record.seen.push_back(use);
}

// "efficient instead of flash for 512-wide heads in fp16": the preference named where torch
// could not follow it.
std::string describe(const AttentionKernelUse& use) {
  std::string text = use.kernel;
  const std::string preferred = attention_backend_name(use.preferred);
  if (use.preferred != AttentionBackend::automatic && preferred != use.kernel)
    text += " instead of " + preferred;
  text += " for " + std::to_string(use.head_size) + "-wide heads in " + precision_name(use.dtype);
  if (use.device != torch::kCUDA) text += " on the " + c10::DeviceTypeName(use.device);
  if (use.causal) text += ", causal";
  if (use.with_gradients) text += " with gradients";
  return text;
}

}  // namespace

const std::vector<std::pair<std::string, AttentionBackend>>& attention_backend_names() {
  static const std::vector<std::pair<std::string, AttentionBackend>> names = {
      {"auto", AttentionBackend::automatic},
      {"flash", AttentionBackend::flash},
      {"efficient", AttentionBackend::efficient},
      {"cudnn", AttentionBackend::cudnn},
      {"math", AttentionBackend::math}};
  return names;
}

std::string attention_backend_name(AttentionBackend backend) {
  for (const auto& [name, value] : attention_backend_names())
    if (value == backend) return name;
  return "?";
}

PreferredAttentionBackend::PreferredAttentionBackend(AttentionBackend backend)
    : saved_flash_(at::globalContext().userEnabledFlashSDP()),
      saved_preference_(current_preference.load()) {
  at::Context& context = at::globalContext();
  for (const at::SDPBackend saved : context.sDPPriorityOrder())
    saved_order_.push_back(static_cast<int64_t>(saved));
  current_preference.store(backend);
  if (backend == AttentionBackend::automatic) return;
  // The chosen kernel first, the others after it in the order they had.
  const auto first = static_cast<int64_t>(torch_backend(backend));
  std::vector<int64_t> order = {first};
  for (const int64_t other : saved_order_)
    if (other != first) order.push_back(other);
  context.setSDPPriorityOrder(order);
  // The CPU ignores the order (flash, then math); its flash switch is the only choice there.
  if (backend == AttentionBackend::math) context.setSDPUseFlash(false);
}

PreferredAttentionBackend::~PreferredAttentionBackend() {
  at::Context& context = at::globalContext();
  context.setSDPPriorityOrder(saved_order_);
  context.setSDPUseFlash(saved_flash_);
  current_preference.store(saved_preference_);
}

torch::Tensor attention_kernel(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, bool is_causal) {
  note_kernel(q, k, v, is_causal);
  return at::scaled_dot_product_attention(q, k, v, /*attn_mask=*/std::nullopt,
                                          /*dropout_p=*/0.0, is_causal);
}

std::vector<AttentionKernelUse> attention_kernels_used() {
  KernelRecord& record = kernel_record();
  std::lock_guard<std::mutex> lock(record.mutex);
  return record.seen;
}

void forget_attention_kernels() {
  KernelRecord& record = kernel_record();
  std::lock_guard<std::mutex> lock(record.mutex);
  record.seen.clear();
}

std::string describe_attention_kernels() {
  const std::vector<AttentionKernelUse> used = attention_kernels_used();
  if (used.empty()) return "";
  std::string text = "attention kernels: ";
  for (size_t i = 0; i < used.size(); ++i) text += (i ? "; " : "") + describe(used[i]);
  return text;
}

}  // namespace sdtrain::models
