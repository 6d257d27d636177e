#pragma once
// Reading a few values the device computed without making the device wait for the host
// (docs/performance.md, "No host synchronisation in the step").
//
// queue() starts a non-blocking copy of the values into pinned host memory and records an
// event behind it on the device's current stream; take() waits for that event and returns the
// values. The trainer queues a step's loss, gradient norm, loss scale and overflow flags when it
// queues the step, and takes them after it has queued the next step's forward pass: by then the
// copy has long arrived, the wait returns at once, and the device has the forward pass to work
// on meanwhile. On the CPU the copy is made at once.

#include <c10/core/Event.h>
#include <torch/torch.h>

#include <optional>
#include <vector>

namespace sdtrain::train {

class DeviceReadback {
 public:
  // `values`: float32, any shape, on any device. Throws std::logic_error while values are queued.
  void queue(const torch::Tensor& values);
  bool queued() const { return host_.defined(); }
  // The queued values, flattened; empties the readback. Throws std::logic_error when none.
  std::vector<float> take();

 private:
  torch::Tensor host_;  // pinned for a CUDA device
  std::optional<c10::Event> copied_;
};

}  // namespace sdtrain::train
