// The staging ring that carries weights to the GPU (models/staged_copy.h): its pieces must
// reassemble every tensor bit for bit as the direct `.to()` gives it. The CPU tests stage copies
// to the CPU with buffers of a few dozen bytes, so tensors cross many pieces, partial last
// pieces and every buffer of the ring; the GPU test runs the pinned, event-ordered ring.

#include "sdtrain/models/staged_copy.h"

#include <c10/core/impl/VirtualGuardImpl.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/models/state_dict.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "test_support.h"

using namespace sdtrain;

namespace {

struct Case {
  torch::Tensor source;
  torch::Tensor target;  // given its shape and layout; the copy sets its data
  torch::TensorOptions options;
};

// Sources of several dtypes, shapes and layouts, each against a target of its own.
std::vector<Case> cases(const torch::Device& device) {
  torch::manual_seed(5);
  const auto on = [&](c10::ScalarType dtype) {
    return torch::TensorOptions().device(device).dtype(dtype);
  };
  std::vector<Case> all;
  all.push_back({torch::randn({7, 13}), torch::empty({7, 13}), on(torch::kHalf)});
  all.push_back({torch::randn({300}), torch::empty({300}), on(torch::kBFloat16)});
  all.push_back(
      {torch::randn({32}, torch::kHalf), torch::empty({32}), on(torch::kHalf)});  // one whole piece
  all.push_back(
      {torch::arange(5, torch::kLong), torch::empty({5}, torch::kLong), on(torch::kLong)});
  all.push_back({torch::randn({8, 3, 3, 3}),
                 torch::empty({8, 3, 3, 3}).contiguous(torch::MemoryFormat::ChannelsLast),
                 on(torch::kFloat)});
  all.push_back(
      {torch::randn({9, 6}).t(), torch::empty({6, 9}), on(torch::kFloat)});  // not contiguous
  all.push_back({torch::empty({0, 4}), torch::empty({0, 4}), on(torch::kHalf)});
  return all;
}

std::vector<models::TensorCopy> copies_of(const std::vector<Case>& all) {
  std::vector<models::TensorCopy> copies;
  for (const Case& c : all)
    copies.push_back({[source = c.source] { return source; }, c.target, c.options});
  return copies;
}

void expect_direct_copies(const std::vector<Case>& all) {
  for (std::size_t i = 0; i < all.size(); ++i) {
    SCOPED_TRACE("case " + std::to_string(i));
    const torch::Tensor expected = all[i].source.to(all[i].options);
    ASSERT_EQ(all[i].target.scalar_type(), expected.scalar_type());
    ASSERT_EQ(all[i].target.device(), expected.device());
    EXPECT_TRUE(torch::equal(all[i].target.cpu(), expected.cpu()));
    EXPECT_EQ(models::is_channels_last(all[i].target), i == 4);
  }
}

std::map<std::string, torch::Tensor> tensors_of(const torch::nn::Module& module) {
  std::map<std::string, torch::Tensor> tensors;
  for (const auto& [key, value] : models::state_dict(module)) tensors.emplace(key, value.cpu());
  return tensors;
}

}  // namespace

class StagedCopyRing : public ::testing::TestWithParam<int> {};

TEST_P(StagedCopyRing, PiecesGiveTheDirectCopyBitForBit) {
  const std::vector<Case> all = cases(torch::kCPU);
  // 64 bytes: 16 float32 or 32 half elements a piece, so the 300-element tensor takes 10 pieces
  // (the last one partial) and the ring is reused dozens of times.
  models::copy_into_targets(copies_of(all), models::Staging{64, GetParam()});
  expect_direct_copies(all);
}

INSTANTIATE_TEST_SUITE_P(Buffers, StagedCopyRing, ::testing::Values(1, 2, 3));

TEST(StagedCopy, DirectCopiesStayAsTheyWere) {
  const std::vector<Case> all = cases(torch::kCPU);
  models::copy_into_targets(copies_of(all), std::nullopt);
  expect_direct_copies(all);
}

TEST(StagedCopy, ARingBufferSmallerThanAnyElementIsRefused) {
  const std::vector<Case> all = cases(torch::kCPU);
  EXPECT_THROW(models::copy_into_targets(copies_of(all), models::Staging{8, 2}), std::logic_error);
}

TEST(StagedCopy, OnlyCudaStagesByDefault) {
  EXPECT_TRUE(models::staged_by_default(torch::Device(torch::kCUDA)));
  EXPECT_FALSE(models::staged_by_default(torch::kCPU));
}

// The whole load path (load_state_dict) staged against direct, in bfloat16 so every floating
// tensor is cast on its way.
TEST(StagedCopy, ALoadedUNetIsTheSameStagedOrDirect) {
  const io::ModelFolder folder(sdtrain::testing::source_dir() / "configs" / "demo" / "model");
  models::LoadOptions direct{torch::kBFloat16, torch::kCPU};
  direct.staged = false;
  models::LoadOptions staged = direct;
  staged.staged = true;
  staged.staging = {256, 2};
  const auto expected = tensors_of(*models::load_unet(folder, direct));
  const auto actual = tensors_of(*models::load_unet(folder, staged));
  ASSERT_EQ(actual.size(), expected.size());
  for (const auto& [key, value] : expected) {
    ASSERT_TRUE(actual.count(key)) << key;
    EXPECT_EQ(actual.at(key).scalar_type(), value.scalar_type()) << key;
    EXPECT_TRUE(torch::equal(actual.at(key), value)) << key;
  }
}

TEST(StagedCopyOnCuda, PinnedPiecesGiveTheHostValuesAndAreDoneOnReturn) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device on this machine";
  const std::vector<Case> all = cases(torch::Device(torch::kCUDA));
  // 4 KiB buffers: the demo-sized tensors above fit in one piece, so stage a larger set too.
  std::vector<Case> large = all;
  large.push_back({torch::randn({1 << 16}), torch::empty({1 << 16}),
                   torch::TensorOptions().device(torch::kCUDA).dtype(torch::kHalf)});
  models::copy_into_targets(copies_of(large), models::Staging{4096, 2});
  const c10::impl::VirtualGuardImpl cuda(c10::DeviceType::CUDA);
  EXPECT_TRUE(cuda.queryStream(cuda.getStream(torch::Device(torch::kCUDA))))
      << "copy_into_targets returned with copies still queued";
  expect_direct_copies(all);
  EXPECT_TRUE(torch::equal(large.back().target.cpu(), large.back().source.to(torch::kHalf)));

  const io::ModelFolder folder(sdtrain::testing::source_dir() / "configs" / "demo" / "model");
  const auto on_host = tensors_of(*models::load_unet(folder, {torch::kHalf, torch::kCPU}));
  const auto on_gpu =
      tensors_of(*models::load_unet(folder, {torch::kHalf, torch::Device(torch::kCUDA)}));
  for (const auto& [key, value] : on_host) EXPECT_TRUE(torch::equal(on_gpu.at(key), value)) << key;
}
