// The output_dir rules as functions: which output folders would write into an input, and how
// metrics.jsonl is read and cut back after a kill.
#include "sdtrain/train/output_dir.h"

#include <gtest/gtest.h>

#include <fstream>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace sdtrain::train {
namespace {

TrainConfig config_with_output(const fs::path& root, const fs::path& output) {
  TrainConfig config;
  config.pretrained_model_name_or_path = (root / "models" / "sd21").string();
  config.data.instance_data_dir = (root / "photos").string();
  config.class_images.class_data_dir = (root / "out" / "class_images").string();
  config.outputs.output_dir = output.string();
  return config;
}

TEST(OutputDirGuard, RefusesOutputFoldersThatWouldWriteIntoAnInput) {
  const fs::path root = testing::scratch_dir();
  const std::vector<std::string> components = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"};
  for (const fs::path& bad : {root / "models" / "sd21", root / "models" / "sd21" / "out", root / "photos",
                              root / "photos" / "run", root / "models" / "sd21" / ".." / "sd21"}) {
    EXPECT_THROW(check_output_dir_is_not_an_input(config_with_output(root, bad), components), ConfigError) << bad;
  }
  // The class folder as output_dir, or the model under a folder a run writes (unet/).
  TrainConfig config = config_with_output(root, root / "out" / "class_images");
  EXPECT_THROW(check_output_dir_is_not_an_input(config, components), ConfigError);
  config = config_with_output(root, root / "out");
  config.pretrained_model_name_or_path = (root / "out" / "unet").string();
  EXPECT_THROW(check_output_dir_is_not_an_input(config, components), ConfigError);

  // Fine: a sibling folder, a folder above the model (its "models/" is not written), and the
  // default class folder inside output_dir.
  for (const fs::path& good : {root / "out", root / "runs" / "cat", root}) {
    EXPECT_NO_THROW(check_output_dir_is_not_an_input(config_with_output(root, good), components)) << good;
  }
}

TEST(MetricsLines, ATornLastLineIsSkippedAndCutBackWithLaterSteps) {
  const fs::path metrics = testing::scratch_dir() / "metrics.jsonl";
  std::ofstream(metrics) << "{\"step\":1}\n{\"step\":2}\nnot json\n{\"step\":3}\n{\"step\":4}\n{\"step\":5,\"lo";
  const auto records = read_json_lines(metrics);
  ASSERT_EQ(records.size(), 4u);
  EXPECT_EQ(records.back(), "{\"step\":4}");
  keep_metrics_up_to(metrics, 3);
  EXPECT_EQ(read_file(metrics), "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n");
}

}  // namespace
}  // namespace sdtrain::train
