// Building a model for a load without initialising it (models/uninitialised.h): nothing is
// drawn or written while it is built, the layout is the initialised model's, the scope leaves
// the thread as it found it, and a load through it gives exactly the file's tensors.

#include "sdtrain/models/uninitialised.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/model_folder.h"
#include "sdtrain/io/safetensors.h"
#include "sdtrain/models/clip_text_model.h"
#include "sdtrain/models/unet_2d_condition.h"
#include "test_support.h"

using namespace sdtrain;

namespace {

torch::Tensor default_generator_state() { return at::detail::getDefaultCPUGenerator().get_state(); }

const std::filesystem::path& demo_model() {
  static const auto path = sdtrain::testing::source_dir() / "configs" / "demo" / "model";
  return path;
}

}  // namespace

TEST(Uninitialised, BuildsTheSameLayoutWithoutDrawingRandomNumbers) {
  const io::ModelFolder folder(demo_model());
  const auto config = models::UNet2DConditionConfig::from_json(folder.config("unet"));
  const torch::Tensor before = default_generator_state();
  const auto empty =
      models::build_uninitialised([&] { return models::UNet2DConditionModel(config); });
  // torch::nn's initialisers draw from the default generator: an initialised build moves it.
  EXPECT_TRUE(torch::equal(default_generator_state(), before));
  const models::UNet2DConditionModel initialised(config);
  EXPECT_FALSE(torch::equal(default_generator_state(), before));

  const auto expected = initialised->named_parameters(true);
  const auto built = empty->named_parameters(true);
  ASSERT_EQ(built.size(), expected.size());
  for (size_t i = 0; i < built.size(); ++i) {
    EXPECT_EQ(built[i].key(), expected[i].key());
    EXPECT_EQ(built[i].value().sizes(), expected[i].value().sizes()) << built[i].key();
    EXPECT_EQ(built[i].value().scalar_type(), expected[i].value().scalar_type());
    EXPECT_TRUE(built[i].value().device().is_cpu()) << built[i].key();
    EXPECT_TRUE(built[i].value().requires_grad()) << built[i].key();
  }
}

// With IncludeDispatchKeyGuard the Meta backend bit outlived the scope and every later operator
// on a CPU tensor ran its Meta kernel (no values; item() threw).
TEST(Uninitialised, LeavesTheThreadsDispatchKeysAsItFoundThem) {
  const c10::impl::LocalDispatchKeySet before = c10::impl::tls_local_dispatch_key_set();
  { models::UninitialisedScope scope; }
  const c10::impl::LocalDispatchKeySet after = c10::impl::tls_local_dispatch_key_set();
  EXPECT_EQ(after.included_, before.included_);
  EXPECT_EQ(after.excluded_, before.excluded_);
  EXPECT_EQ(torch::full({4}, 2.5).sum().item<double>(), 10.0);
}

TEST(Uninitialised, ALoadGivesEveryTensorOfTheFile) {
  const io::ModelFolder folder(demo_model());
  const models::CLIPTextModel model = models::load_text_encoder(folder);
  const io::SafetensorsFile file(demo_model() / "text_encoder" / "model.safetensors");
  int64_t compared = 0;
  for (const auto& item : model->named_parameters(true)) {
    const std::string key = item.key();
    // The module's keys carry transformers' "text_model." prefix; this file's do not.
    const std::string stored_key =
        file.find(key) ? key : key.substr(std::string("text_model.").size());
    const torch::Tensor stored = file.tensor(stored_key);
    EXPECT_TRUE(torch::equal(item.value(), stored.to(torch::kFloat))) << key;
    ++compared;
  }
  EXPECT_GT(compared, 0);
}
