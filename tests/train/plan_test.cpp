#include "sdtrain/train/plan.h"

#include <gtest/gtest.h>

#include "sdtrain/optim/optimizer.h"
#include "test_support.h"

using namespace sdtrain::train;

namespace {

TrainConfig demo_config(const std::vector<std::string>& overrides = {}) {
  return load_train_config(sdtrain::testing::source_dir() / "configs" / "demo.json", overrides);
}

}  // namespace

TEST(TrainingPlan, CountsStepsAsDiffusersDreamBoothDataset) {
  // 4 photos, prior preservation with 10 class images: an epoch is max(10, 4) = 10 samples;
  // batch 3 gives 4 batches, accumulation 2 gives 2 optimizer steps per epoch.
  // An empty class folder of its own: the demo's default one fills up when the demo runs.
  const auto classes = sdtrain::testing::scratch_dir();
  auto plan = plan_training(demo_config({"num_class_images=10", "train_batch_size=3", "gradient_accumulation_steps=2",
                                         "max_steps=null", "epochs=5", "class_data_dir=" + classes.string()}));
  EXPECT_EQ(plan.instance_images.size(), 4u);
  EXPECT_EQ(plan.dataset_length, 10);
  EXPECT_EQ(plan.steps_per_epoch, 2);
  EXPECT_EQ(plan.total_steps, 10);
  EXPECT_EQ(plan.class_images_to_generate, 10);
}

TEST(TrainingPlan, MemoryEstimateUsesTheOptimizerStateSize) {
  auto adamw = plan_training(demo_config());
  auto eight_bit = plan_training(demo_config({"optimizer=adamw8bit"}));
  const auto& unet = adamw.components.at(0);
  ASSERT_EQ(unet.name, "unet");
  EXPECT_EQ(adamw.memory.optimizer_state, 8 * unet.parameters);
  EXPECT_EQ(eight_bit.memory.optimizer_state, sdtrain::optim::adamw8bit_state_bytes(unet.tensor_sizes));
  EXPECT_LT(eight_bit.memory.optimizer_state, adamw.memory.optimizer_state);
  EXPECT_EQ(adamw.memory.trained_weights, 4 * unet.parameters);
}

TEST(TrainingPlan, PromptsComeFromDatasetInfoUnlessConfigured) {
  EXPECT_EQ(plan_training(demo_config()).config.data.instance_prompt, "a photo of sks robot");
  auto plan = plan_training(demo_config({"instance_prompt=a photo of zwx robot"}));
  EXPECT_EQ(plan.config.data.instance_prompt, "a photo of zwx robot");
  ASSERT_FALSE(plan.warnings.empty());
  EXPECT_NE(plan.warnings.front().find("overrides dataset_info.json"), std::string::npos);
}
