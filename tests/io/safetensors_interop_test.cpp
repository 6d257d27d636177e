// Files written by sdtrain load in Python's safetensors/torch, and files written there load
// here, bit for bit, for every dtype (the reference environment from scripts/setup.sh).

#include <gtest/gtest.h>
#include <torch/torch.h>

#include "sdtrain/io/safetensors.h"
#include "test_support.h"

using namespace sdtrain::io;

namespace {

// The pattern of tests/io/safetensors_interop.py: ((arange(10)*7 + k) % 23 - 11), shape [2, 5].
NamedTensors pattern() {
  const std::vector<std::pair<std::string, c10::ScalarType>> dtypes = {
      {"f64", torch::kDouble}, {"f32", torch::kFloat}, {"f16", torch::kHalf}, {"bf16", torch::kBFloat16},
      {"i64", torch::kLong}, {"i32", torch::kInt}, {"i16", torch::kShort}, {"i8", torch::kChar},
      {"u8", torch::kByte}, {"bool", torch::kBool}, {"f8e4m3", torch::kFloat8_e4m3fn}, {"f8e5m2", torch::kFloat8_e5m2}};
  NamedTensors tensors;
  for (std::size_t k = 0; k < dtypes.size(); ++k) {
    auto values = torch::remainder(torch::arange(10, torch::kLong) * 7 + static_cast<int64_t>(k), 23) - 11;
    const auto& [name, dtype] = dtypes[k];
    if (dtype == torch::kByte) values = values + 11;
    auto tensor = dtype == torch::kBool ? values.gt(0) : values.to(torch::kFloat).to(dtype);
    tensors.emplace_back(name, tensor.reshape({2, 5}));
  }
  return tensors;
}

std::string script() { return (sdtrain::testing::source_dir() / "tests/io/safetensors_interop.py").string(); }

}  // namespace

TEST(SafetensorsInterop, PythonReadsWhatSdtrainWrites) {
  std::string python = sdtrain::testing::reference_python();
  if (python.empty()) GTEST_SKIP() << "reference Python environment not configured (scripts/setup.sh makes it)";
  auto path = sdtrain::testing::scratch_dir() / "ours.safetensors";
  save_safetensors(path, pattern());
  std::string output;
  EXPECT_EQ(sdtrain::testing::run_command(python + " " + script() + " check " + path.string(), &output), 0) << output;
}

TEST(SafetensorsInterop, SdtrainReadsWhatPythonWrites) {
  std::string python = sdtrain::testing::reference_python();
  if (python.empty()) GTEST_SKIP() << "reference Python environment not configured (scripts/setup.sh makes it)";
  auto path = sdtrain::testing::scratch_dir() / "theirs.safetensors";
  std::string output;
  ASSERT_EQ(sdtrain::testing::run_command(python + " " + script() + " write " + path.string(), &output), 0) << output;
  SafetensorsFile file(path);
  EXPECT_EQ(file.metadata().at("writer"), "python");
  auto expected = pattern();
  ASSERT_EQ(file.tensors().size(), expected.size());
  for (const auto& [name, tensor] : expected) {
    auto loaded = file.tensor(name);
    EXPECT_EQ(loaded.scalar_type(), tensor.scalar_type()) << name;
    ASSERT_EQ(loaded.sizes(), tensor.sizes()) << name;
    EXPECT_EQ(std::memcmp(loaded.contiguous().data_ptr(), tensor.contiguous().data_ptr(), tensor.nbytes()), 0) << name;
  }
}
