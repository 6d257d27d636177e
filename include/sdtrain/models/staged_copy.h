#pragma once
// Host tensors (views of memory-mapped weight files) copied into a model's parameters on their
// device. A direct `.to(cuda, dtype)` per tensor casts on the host into a fresh pageable buffer,
// then copies it while the host waits: reading the file (its page faults and the cast) and the
// transfer take turns, and every tensor first touches new host memory. Staged, the host casts
// each piece of a tensor into one of a few pinned buffers while the copy engine transfers the
// piece before it, so reading overlaps the transfer (docs/performance.md, "Reading overlaps the
// transfer"). The values are the same bits either way.

#include <torch/torch.h>

#include <cstdint>
#include <functional>
#include <optional>
#include <vector>

namespace sdtrain::models {

struct TensorCopy {
  // The host tensor, any layout, asked for when its turn comes: a view of a mapped file, or
  // an aligned copy of one (io::SafetensorsFile::tensor), so at most one such copy is alive.
  std::function<torch::Tensor()> source;
  torch::Tensor target;          // a parameter or buffer; its data becomes the copy
  torch::TensorOptions options;  // the copy's device and dtype
};

// The staging ring: `buffers` host buffers of `buffer_bytes` each, pinned when the copies go to
// CUDA. Two buffers are enough for the host to fill one while the other is in flight; a tensor
// larger than a buffer goes through in pieces.
struct Staging {
  int64_t buffer_bytes = int64_t{32} << 20;
  int buffers = 2;
};

// Whether copies to `device` are staged unless a caller says otherwise: on CUDA, where there is
// a transfer to overlap. On the CPU the direct copy is already the one copy there is.
bool staged_by_default(const torch::Device& device);

// Sets each copy's target to its source in the copy's device and dtype, in the target's layout
// (models::in_layout_of), bit for bit what `source().to(options)` gives. With `staging` every
// source goes through the ring (the tests stage copies to the CPU to check the pieces); without,
// each is copied directly. Returns when every copy is complete on its device. All copies go to
// one device.
void copy_into_targets(const std::vector<TensorCopy>& copies,
                       const std::optional<Staging>& staging);

}  // namespace sdtrain::models
