#pragma once
// Data parallel's gradient reduction (docs/scaling.md). The trained parameters, given in the
// order the backward pass produces their gradients (the caller knows: last layers first), are
// grouped into buckets of about 25 MiB, as torch.nn.parallel.DistributedDataParallel does. In
// the last backward pass of an optimizer step, a post-accumulate-grad hook counts each
// parameter's gradient in; when a bucket is complete it is flattened and its all-reduce starts
// at once, so communication runs while the backward pass computes the layers before it.
// Buckets start in one order on every process (a bucket waits for those before it), as
// collectives must. reduce() waits for them, divides by the number of processes and writes the
// averages back into the gradients.

#include <torch/torch.h>

#include <functional>
#include <memory>
#include <vector>

#include "sdtrain/train/distributed.h"
#include "sdtrain/train/update.h"

namespace sdtrain::train {

class BucketedAllReduce final : public GradientReduction {
 public:
  static constexpr int64_t kDefaultBucketBytes = int64_t{25} << 20;  // DDP's bucket_cap_mb

  // `parameters` in the order their gradients arrive in the backward pass.
  BucketedAllReduce(std::shared_ptr<ProcessGroup> group, std::vector<torch::Tensor> parameters,
                    int64_t bucket_bytes = kDefaultBucketBytes);
  ~BucketedAllReduce() override;  // removes the hooks

  void before_backward(bool last_of_step) override;
  void reduce(const std::vector<torch::Tensor>& gradients) override;

  // The hook's work for parameter `index` (public for the hook object only).
  void on_gradient(size_t index);
  size_t bucket_count() const { return buckets_.size(); }

 private:
  struct Bucket {
    std::vector<size_t> members;  // parameter indices, in the order they are laid out
    torch::Tensor flat;
    size_t ready = 0;
    bool started = false;
    std::function<void()> wait;
  };
  void start(Bucket& bucket);
  void start_ready_buckets();

  std::shared_ptr<ProcessGroup> group_;
  std::vector<torch::Tensor> parameters_;
  std::vector<Bucket> buckets_;
  std::vector<size_t> bucket_of_;  // parameter index -> bucket index
  size_t next_to_start_ = 0;
  bool armed_ = false;
};

}  // namespace sdtrain::train
