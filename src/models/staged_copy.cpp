#include "sdtrain/models/staged_copy.h"

#include <c10/core/Event.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <algorithm>
#include <stdexcept>

#include "sdtrain/models/state_dict.h"

namespace sdtrain::models {
namespace {

// The ring of staging buffers and, on CUDA, the event of each buffer's last transfer: a buffer
// is written again only after the copy engine has read it.
class StagingRing {
 public:
  StagingRing(const Staging& staging, const torch::Device& device)
      : buffer_bytes_(staging.buffer_bytes) {
    if (staging.buffers < 1 || staging.buffer_bytes < 16)
      throw std::logic_error(
          "copy_into_targets: a staging ring needs a buffer or more, of 16 bytes or more");
    const bool pinned = device.is_cuda();
    if (pinned) stream_ = c10::impl::VirtualGuardImpl(device.type()).getStream(device);
    for (int i = 0; i < staging.buffers; ++i) {
      buffers_.push_back(torch::empty(
          {buffer_bytes_}, torch::TensorOptions().dtype(torch::kByte).pinned_memory(pinned)));
      if (pinned) transferred_.emplace_back(device.type());
    }
  }

  int64_t buffer_bytes() const { return buffer_bytes_; }

  // The next buffer as `count` elements of `dtype`, once the copy engine is done with it.
  torch::Tensor next(c10::ScalarType dtype, int64_t count) {
    current_ = (current_ + 1) % buffers_.size();
    if (!transferred_.empty()) transferred_[current_].synchronize();
    return buffers_[current_].narrow(0, 0, count * c10::elementSize(dtype)).view(dtype);
  }

  // Marks the current buffer as in flight: its copy was just queued on the device's stream.
  void queued() {
    if (!transferred_.empty()) transferred_[current_].record(*stream_);
  }

  // Waits for every queued copy, so the targets are complete when copy_into_targets returns.
  void finish() const {
    if (stream_) c10::impl::VirtualGuardImpl(stream_->device_type()).synchronizeStream(*stream_);
  }

 private:
  int64_t buffer_bytes_;
  std::vector<torch::Tensor> buffers_;
  std::vector<c10::Event> transferred_;
  std::optional<c10::Stream> stream_;
  std::size_t current_ = 0;
};

// `source` in `options`, through the ring a piece at a time: the host reads and casts a piece
// into a buffer while the copies of the pieces before it are still in flight.
torch::Tensor staged(const torch::Tensor& source, const torch::TensorOptions& options,
                     StagingRing& ring) {
  const c10::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  torch::Tensor result = torch::empty(source.sizes(), options);
  const torch::Tensor from = source.reshape({-1});
  const torch::Tensor into = result.view({-1});
  const int64_t per_piece = ring.buffer_bytes() / static_cast<int64_t>(c10::elementSize(dtype));
  for (int64_t begin = 0; begin < from.numel(); begin += per_piece) {
    const int64_t count = std::min(per_piece, from.numel() - begin);
    torch::Tensor piece = ring.next(dtype, count);
    piece.copy_(from.narrow(0, begin, count));
    into.narrow(0, begin, count).copy_(piece, /*non_blocking=*/true);
    ring.queued();
  }
  return result;
}

}  // namespace

bool staged_by_default(const torch::Device& device) { return device.is_cuda(); }

void copy_into_targets(const std::vector<TensorCopy>& copies,
                       const std::optional<Staging>& staging) {
  if (copies.empty()) return;
  torch::NoGradGuard no_grad;
  const torch::Device device = copies.front().options.device();
  std::optional<StagingRing> ring;
  if (staging) ring.emplace(*staging, device);
  for (const TensorCopy& copy : copies) {
    if (copy.options.device() != device)
      throw std::logic_error("copy_into_targets: the copies go to two devices");
    const torch::Tensor source = copy.source();
    torch::Tensor value = ring ? staged(source, copy.options, *ring)
                               : source.to(copy.options, /*non_blocking=*/false, /*copy=*/true);
    torch::Tensor target = copy.target;
    target.set_data(in_layout_of(value, target));
  }
  if (ring) ring->finish();
}

}  // namespace sdtrain::models
