#include "sdtrain/train/gradient_buckets.h"

#include "sdtrain/train/gradient_hooks.h"

namespace sdtrain::train {

BucketedAllReduce::BucketedAllReduce(std::shared_ptr<ProcessGroup> group,
                                     std::vector<torch::Tensor> parameters, int64_t bucket_bytes)
    : group_(std::move(group)), parameters_(std::move(parameters)) {
  bucket_of_.resize(parameters_.size());
  int64_t bytes = 0;
  for (size_t i = 0; i < parameters_.size(); ++i) {
    const torch::Tensor& parameter = parameters_[i];
    const bool same_kind =
        !buckets_.empty() &&
        parameters_[buckets_.back().members.front()].scalar_type() == parameter.scalar_type();
    if (buckets_.empty() || !same_kind || bytes >= bucket_bytes) {
      buckets_.emplace_back();
      bytes = 0;
    }
    buckets_.back().members.push_back(i);
    bucket_of_[i] = buckets_.size() - 1;
    bytes += parameter.numel() * parameter.element_size();
  }
  for (Bucket& bucket : buckets_) {
    int64_t numel = 0;
    for (size_t i : bucket.members) numel += parameters_[i].numel();
    bucket.flat = torch::empty({numel}, parameters_[bucket.members.front()].options());
  }
  for (size_t i = 0; i < parameters_.size(); ++i)
    set_post_accumulate_grad_hook(parameters_[i], [this, i] { on_gradient(i); });
}

BucketedAllReduce::~BucketedAllReduce() {
  for (const auto& parameter : parameters_) set_post_accumulate_grad_hook(parameter, nullptr);
}

void BucketedAllReduce::before_backward(bool last_of_step) { armed_ = last_of_step; }

void BucketedAllReduce::on_gradient(size_t index) {
  if (!armed_) return;  // an earlier micro-batch of the step: its gradient is not final yet
  Bucket& bucket = buckets_[bucket_of_[index]];
  if (++bucket.ready == bucket.members.size()) start_ready_buckets();
}

void BucketedAllReduce::start_ready_buckets() {
  while (next_to_start_ < buckets_.size() &&
         buckets_[next_to_start_].ready == buckets_[next_to_start_].members.size())
    start(buckets_[next_to_start_++]);
}

void BucketedAllReduce::start(Bucket& bucket) {
  torch::NoGradGuard no_grad;
  int64_t offset = 0;
  for (size_t i : bucket.members) {
    const torch::Tensor& grad = parameters_[i].grad();
    torch::Tensor slot = bucket.flat.narrow(0, offset, parameters_[i].numel());
    // A parameter without a gradient this step (unused by every process alike) adds zeros.
    if (grad.defined())
      slot.copy_(grad.reshape(-1));
    else
      slot.zero_();
    offset += parameters_[i].numel();
  }
  bucket.wait = group_->all_reduce_sum_async(bucket.flat);
  bucket.started = true;
}

void BucketedAllReduce::reduce(const std::vector<torch::Tensor>&) {
  torch::NoGradGuard no_grad;
  // Buckets whose hooks did not all fire (parameters without a gradient) start now, in order.
  for (; next_to_start_ < buckets_.size(); ++next_to_start_) start(buckets_[next_to_start_]);
  const double inverse_world = 1.0 / static_cast<double>(group_->size());
  for (Bucket& bucket : buckets_) {
    bucket.wait();
    bucket.flat.mul_(inverse_world);
    int64_t offset = 0;
    for (size_t i : bucket.members) {
      torch::Tensor& grad = parameters_[i].mutable_grad();
      if (grad.defined())
        grad.copy_(bucket.flat.narrow(0, offset, parameters_[i].numel()).view_as(grad));
      offset += parameters_[i].numel();
    }
    bucket.ready = 0;
    bucket.started = false;
    bucket.wait = nullptr;
  }
  next_to_start_ = 0;
  armed_ = false;
}

}  // namespace sdtrain::train
