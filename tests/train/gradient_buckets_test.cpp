// BucketedAllReduce (docs/scaling.md) against a process group of two identical processes played
// by one: its all-reduce doubles the tensor, as summing two equal gradients does. Checked: the
// gradients come back averaged (equal to one process's), buckets start during the backward
// pass (before its last gradient exists), in order, last layers first, and only in the backward
// pass that completes a step.
#include "sdtrain/train/gradient_buckets.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

namespace {

using sdtrain::train::BucketedAllReduce;

class TwinProcesses final : public sdtrain::train::ProcessGroup {
 public:
  int rank() const override { return 0; }
  int size() const override { return 2; }
  std::string backend() const override { return "twin"; }
  std::function<void()> all_reduce_sum_async(torch::Tensor tensor) override {
    started.push_back(tensor.numel());
    gradients_when_started.push_back(gradients_seen);
    return [tensor]() mutable { tensor.mul_(2); };
  }
  void barrier() override {}

  std::vector<int64_t> started;             // bucket sizes, in start order
  std::vector<int> gradients_when_started;  // gradients produced when each bucket started
  int gradients_seen = 0;
};

// Four layers in a chain: the backward pass produces the last one's gradients first.
struct Chain {
  std::vector<torch::Tensor> weights;
  Chain() {
    torch::manual_seed(0);
    for (int i = 0; i < 4; ++i) weights.push_back(torch::randn({8, 8}).requires_grad_(true));
  }
  torch::Tensor loss(const torch::Tensor& input) const {
    torch::Tensor x = input;
    for (const auto& w : weights) x = torch::tanh(x.matmul(w));
    return x.pow(2).sum();
  }
};

TEST(BucketedAllReduce, AveragesTwinGradientsAndStartsBucketsDuringBackward) {
  Chain chain;
  auto twin = std::make_shared<TwinProcesses>();
  // 256 bytes per weight; a bucket closes once it holds 512: two weights per bucket.
  // In the order the backward pass produces the gradients: the last layer first.
  BucketedAllReduce reduction(twin, {chain.weights.rbegin(), chain.weights.rend()}, 512);
  ASSERT_EQ(reduction.bucket_count(), 2u);
  for (const auto& w : chain.weights) {
    w.register_hook([twin](const torch::Tensor& grad) {
      ++twin->gradients_seen;
      return grad;
    });
  }
  const torch::Tensor input = torch::randn({3, 8});

  // Reference: the same backward without the reduction's hooks armed.
  reduction.before_backward(false);
  chain.loss(input).backward();
  std::vector<torch::Tensor> expected;
  for (const auto& w : chain.weights) expected.push_back(w.grad().clone());
  EXPECT_TRUE(twin->started.empty()) << "a micro-batch that does not end the step reduced";
  for (const auto& w : chain.weights) w.mutable_grad() = torch::Tensor();
  twin->gradients_seen = 0;

  reduction.before_backward(true);
  chain.loss(input).backward();
  ASSERT_EQ(twin->started.size(), 2u);
  EXPECT_EQ(twin->started[0], 128);  // weights 3 and 2 (the last layers)
  EXPECT_LT(twin->gradients_when_started[0], 4) << "the first bucket waited for the whole backward";
  std::vector<torch::Tensor> gradients;
  for (const auto& w : chain.weights) gradients.push_back(w.grad());
  reduction.reduce(gradients);
  for (size_t i = 0; i < chain.weights.size(); ++i)
    EXPECT_TRUE(torch::equal(chain.weights[i].grad(), expected[i])) << "weight " << i;
}

TEST(BucketedAllReduce, BucketsNeverMixDtypes) {
  std::vector<torch::Tensor> parameters = {torch::zeros({4}).requires_grad_(true),
                                           torch::zeros({4}, torch::kBFloat16).requires_grad_(true),
                                           torch::zeros({4}).requires_grad_(true)};
  BucketedAllReduce reduction(std::make_shared<TwinProcesses>(), parameters, 1 << 20);
  EXPECT_EQ(reduction.bucket_count(), 3u);
}

}  // namespace
