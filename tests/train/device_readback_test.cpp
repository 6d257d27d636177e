// DeviceReadback (include/sdtrain/train/device_readback.h): one set of values at a time, taken
// once, flattened in order. On the CPU the copy is made at queue time, so a later change to
// the device tensor does not reach what was queued.
#include "sdtrain/train/device_readback.h"

#include <gtest/gtest.h>

#include <stdexcept>

using sdtrain::train::DeviceReadback;

TEST(DeviceReadback, GivesTheQueuedValuesOnceInOrder) {
  DeviceReadback readback;
  EXPECT_FALSE(readback.queued());
  torch::Tensor values = torch::tensor({1.5f, -2.0f, 3.25f, 0.0f}).reshape({2, 2});
  readback.queue(values);
  EXPECT_TRUE(readback.queued());
  values.fill_(7.0f);  // what was queued is a copy
  EXPECT_EQ(readback.take(), (std::vector<float>{1.5f, -2.0f, 3.25f, 0.0f}));
  EXPECT_FALSE(readback.queued());
}

TEST(DeviceReadback, RefusesASecondQueueAndATakeOfNothing) {
  DeviceReadback readback;
  EXPECT_THROW(readback.take(), std::logic_error);
  readback.queue(torch::zeros({1}));
  EXPECT_THROW(readback.queue(torch::zeros({1})), std::logic_error);
  EXPECT_EQ(readback.take().size(), 1u);
  EXPECT_THROW(readback.queue(torch::zeros({1}, torch::kDouble)), c10::Error);
}
