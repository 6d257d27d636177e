#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::io;

TEST(Safetensors, RoundTripsEveryDtype) {
  auto dir = sdtrain::testing::scratch_dir();
  torch::manual_seed(0);
  NamedTensors tensors = {
      {"f64", torch::randn({3, 5}, torch::kDouble)},
      {"f32", torch::randn({7}, torch::kFloat)},
      {"f16", torch::randn({2, 3, 4}).to(torch::kHalf)},
      {"bf16", torch::randn({5, 1}).to(torch::kBFloat16)},
      {"i64", torch::randint(-1000000, 1000000, {4}, torch::kLong)},
      {"i32", torch::randint(-1000, 1000, {3, 3}, torch::kInt)},
      {"i16", torch::randint(-100, 100, {6}, torch::kShort)},
      {"i8", torch::randint(-100, 100, {5}, torch::kChar)},
      {"u8", torch::randint(0, 255, {9}, torch::kByte)},
      {"bool", torch::randint(0, 2, {11}).to(torch::kBool)},
      {"f8e4m3", torch::randn({8}).to(torch::kFloat8_e4m3fn)},
      {"f8e5m2", torch::randn({8}).to(torch::kFloat8_e5m2)},
      {"scalar", torch::tensor(3.5f)},
      {"empty", torch::empty({0, 4})},
  };
  auto path = dir / "all.safetensors";
  save_safetensors(path, tensors, {{"note", "hello"}});

  SafetensorsFile file(path);
  EXPECT_EQ(file.tensors().size(), tensors.size());
  EXPECT_EQ(file.metadata().at("format"), "pt");
  EXPECT_EQ(file.metadata().at("note"), "hello");
  for (const auto& [name, expected] : tensors) {
    auto loaded = file.tensor(name);
    EXPECT_EQ(loaded.scalar_type(), expected.scalar_type()) << name;
    EXPECT_EQ(loaded.sizes(), expected.sizes()) << name;
    // Bitwise comparison through the raw bytes: NaN-safe and dtype-agnostic.
    auto a = loaded.contiguous(), b = expected.contiguous();
    ASSERT_EQ(a.nbytes(), b.nbytes()) << name;
    EXPECT_EQ(std::memcmp(a.data_ptr(), b.data_ptr(), a.nbytes()), 0) << name;
  }
}

TEST(Safetensors, HeaderIsPaddedAndDataAligned) {
  auto dir = sdtrain::testing::scratch_dir();
  auto path = dir / "a.safetensors";
  save_safetensors(path, {{"w", torch::ones({3})}, {"x", torch::ones({1}, torch::kByte)}});
  auto header = read_safetensors_header(path);
  EXPECT_EQ(header.header_length % 8, 0u);
  SafetensorsFile file(path);
  EXPECT_TRUE(file.is_zero_copy("w"));
}

TEST(Safetensors, ZeroCopyTensorOutlivesFileObjectAndNeverWritesTheFile) {
  auto dir = sdtrain::testing::scratch_dir();
  auto path = dir / "a.safetensors";
  save_safetensors(path, {{"w", torch::arange(16, torch::kFloat)}});
  torch::Tensor w;
  {
    SafetensorsFile file(path);
    ASSERT_TRUE(file.is_zero_copy("w"));
    w = file.tensor("w");
  }
  EXPECT_FLOAT_EQ(w[5].item<float>(), 5.0f);
  w.fill_(42.0f);  // copy-on-write mapping: the file keeps its contents
  SafetensorsFile again(path);
  EXPECT_FLOAT_EQ(again.tensor("w")[5].item<float>(), 5.0f);
}

TEST(Safetensors, WriterLeavesNoTemporaryFiles) {
  auto dir = sdtrain::testing::scratch_dir();
  save_safetensors(dir / "a.safetensors", {{"w", torch::ones({2})}});
  int files = 0;
  for ([[maybe_unused]] const auto& entry : std::filesystem::directory_iterator(dir)) ++files;
  EXPECT_EQ(files, 1);
}

TEST(Safetensors, UnknownTensorNameIsAModelError) {
  auto dir = sdtrain::testing::scratch_dir();
  save_safetensors(dir / "a.safetensors", {{"w", torch::ones({2})}});
  SafetensorsFile file(dir / "a.safetensors");
  try {
    file.tensor("nope");
    FAIL() << "expected an error";
  } catch (const ModelError& e) {
    EXPECT_NE(std::string(e.what()).find("nope"), std::string::npos);
  }
}
