// Prior-preservation class images: only the missing ones are generated, each file atomically
// and with its parameters, and an interrupted run resumes to exactly the files an
// uninterrupted run writes.

#include <gtest/gtest.h>

#include <fstream>

#include "pipeline_support.h"
#include "sdtrain/pipeline/class_images.h"
#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"

namespace fs = std::filesystem;
using namespace sdtrain;
using namespace sdtrain::pipeline;

namespace {

ClassImageOptions small_options(const fs::path& dir) {
  ClassImageOptions options;
  options.class_data_dir = dir;
  options.class_prompt = "a photo of a robot";
  options.num_class_images = 3;
  options.sample_batch_size = 2;
  options.steps = 3;
  options.guidance_scale = 7.5;
  options.seed = 42;
  options.width = options.height = 32;
  return options;
}

std::vector<std::string> names_in(const fs::path& dir) {
  std::vector<std::string> names;
  for (const auto& entry : fs::directory_iterator(dir)) names.push_back(entry.path().filename().string());
  std::sort(names.begin(), names.end());
  return names;
}

TEST(ClassImages, InterruptedRunResumesToTheSameFiles) {
  const auto root = sdtrain::testing::scratch_dir();
  auto& pipeline = sdtrain::testing::demo_pipeline();

  auto whole = small_options(root / "whole");
  EXPECT_EQ(generate_class_images(pipeline, whole), 3);

  auto interrupted = small_options(root / "resumed");
  interrupted.limit = 1;  // the run stops after its first file
  EXPECT_EQ(generate_class_images(pipeline, interrupted), 1);
  // What a kill mid-write leaves behind: a temporary file, which is not an image.
  std::ofstream(root / "resumed" / "class-000001.png.tmp.12345") << "partial";
  EXPECT_EQ(count_class_images(root / "resumed"), 1);
  interrupted.limit.reset();
  std::vector<ClassImageProgress> reports;
  EXPECT_EQ(generate_class_images(pipeline, interrupted, [&](const ClassImageProgress& p) { reports.push_back(p); }), 2);
  ASSERT_FALSE(reports.empty());
  EXPECT_EQ(reports.back().written, 2);
  EXPECT_EQ(reports.back().missing, 2);

  const std::vector<std::string> expected = {"class-000000.png", "class-000001.png", "class-000002.png"};
  EXPECT_EQ(names_in(root / "whole"), expected);
  for (const auto& name : expected) {
    EXPECT_EQ(read_file(root / "whole" / name), read_file(root / "resumed" / name)) << name << " differs";
  }
  // A complete folder: nothing to do, and the model folder is not even opened.
  EXPECT_EQ(generate_class_images(root / "no-model", PipelineSettings{}, whole), 0);
}

TEST(ClassImages, CountsExistingImagesAndWritesParameters) {
  const auto dir = sdtrain::testing::scratch_dir() / "class";
  fs::create_directories(dir);
  fs::copy_file(sdtrain::testing::source_dir() / "configs/demo/instance/robot1.jpg", dir / "mine.JPG");
  std::ofstream(dir / "notes.txt") << "not an image";
  auto options = small_options(dir);
  options.num_class_images = 2;
  EXPECT_EQ(generate_class_images(sdtrain::testing::demo_model(), PipelineSettings{}, options), 1);
  EXPECT_EQ(count_class_images(dir), 2);
  ASSERT_TRUE(fs::exists(dir / "class-000001.png"));  // indexed from the existing count
  const io::Image image = io::read_image(dir / "class-000001.png");
  EXPECT_EQ(image.width, 32);
  const std::string bytes = read_file(dir / "class-000001.png");
  for (const std::string text : {std::string("prompt\0a photo of a robot", 25), std::string("seed\0" "43", 7),
                                 std::string("scheduler\0pndm", 14), std::string("steps\0" "3", 7)}) {
    EXPECT_NE(bytes.find(text), std::string::npos) << "missing tEXt " << text;
  }
}

TEST(ClassImages, UnwritableFolderIsAnOutputError) {
  const auto root = sdtrain::testing::scratch_dir();
  std::ofstream(root / "file") << "x";
  auto options = small_options(root / "file" / "class");
  try {
    generate_class_images(sdtrain::testing::demo_pipeline(), options);
    FAIL() << "expected an OutputError";
  } catch (const OutputError& e) {
    EXPECT_EQ(e.code(), ExitCode::output);
    EXPECT_NE(std::string(e.what()).find("class"), std::string::npos) << e.what();
  }
}

}  // namespace
