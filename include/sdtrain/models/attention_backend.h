#pragma once
// Which kernel runs attention, chosen by the user and reported to them.
//
// at::scaled_dot_product_attention picks one of several kernels for each call: on CUDA flash
// attention, the memory-efficient kernel, the math (unfused) one and cuDNN's, tried in the
// order at::globalContext().sDPPriorityOrder() gives (torch 2.11: flash, efficient, math,
// cuDNN), each only where its own checks pass (dtype, head size, GPU architecture, gradients);
// on the CPU flash attention, then math, whatever that order says. Which one ran is invisible
// from the outside, yet it decides memory and speed: flash needs sm80 or newer and heads no
// wider than 256, so a T4 runs the memory-efficient kernel, and the VAE's single 512-wide head
// never runs flash.
//
// compute.attention_backend (and `generate --attention-backend`) puts one kernel first:
// PreferredAttentionBackend moves it to the front of that order for as long as it lives.
// Where the chosen kernel cannot run an attention (the VAE under "flash", cuDNN on the CPU),
// the call falls back to the rest of torch's order instead of failing; "math" also turns the
// CPU's flash kernel off, the only way to choose on the CPU. Every attention call goes
// through attention_kernel(), which asks torch which kernel it is about to run
// (at::_fused_sdp_choice, the host-side selection SDPA itself calls) the first time it sees a
// kind of call, so the log can say what ran and where a preference was not honoured
// (describe_attention_kernels).

#include <torch/torch.h>

#include <string>
#include <vector>

#include "sdtrain/models/attention_backend_choice.h"

namespace sdtrain::models {

// Puts `backend` first in SDPA's order for this process until destroyed, then restores the
// order (and the CPU flash switch) it found. Scopes nest; automatic changes nothing.
class PreferredAttentionBackend {
 public:
  explicit PreferredAttentionBackend(AttentionBackend backend);
  ~PreferredAttentionBackend();
  PreferredAttentionBackend(const PreferredAttentionBackend&) = delete;
  PreferredAttentionBackend& operator=(const PreferredAttentionBackend&) = delete;

 private:
  std::vector<int64_t> saved_order_;
  bool saved_flash_;
  AttentionBackend saved_preference_;
};

// softmax(q k^T / sqrt(head size) [+ causal mask]) v through at::scaled_dot_product_attention,
// noting which kernel runs it the first time this kind of call is seen.
// q: [B, heads, L, head size], k/v: [B, heads, S, head size].
torch::Tensor attention_kernel(const torch::Tensor& q, const torch::Tensor& k,
                               const torch::Tensor& v, bool is_causal = false);

// One kind of attention call and the kernel torch chose for it.
struct AttentionKernelUse {
  torch::DeviceType device = torch::kCPU;
  c10::ScalarType dtype = torch::kFloat32;
  int64_t head_size = 0;
  bool causal = false;
  bool with_gradients = false;  // autograd records the call (training)
  AttentionBackend preferred = AttentionBackend::automatic;
  std::string kernel;  // the chosen kernel's name: "flash", "efficient", "cudnn" or "math"
};

// Every kind of call seen since the process started (or since forget_attention_kernels), in
// the order first seen.
std::vector<AttentionKernelUse> attention_kernels_used();
void forget_attention_kernels();
// "attention kernels: flash for 64-wide heads in fp16 with gradients; efficient instead of
// flash for 512-wide heads in fp16" (under attention_backend flash); "" when no call was seen.
std::string describe_attention_kernels();

}  // namespace sdtrain::models
