// A corpus of malformed safetensors files, each with the error it must produce. Every case
// goes through both readers (header-only and memory-mapped) and must end in a ModelError (exit
// code 3) that names the file, never a crash.

#include <gtest/gtest.h>

#include <fstream>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/text.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::io;

namespace {

std::string with_length_prefix(const std::string& header, const std::string& data = "") {
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return bytes + header + data;
}

std::string raw_length(uint64_t n, const std::string& rest = "") {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>((n >> (8 * i)) & 0xFF);
  return bytes + rest;
}

struct MalformedCase {
  std::string name;
  std::string bytes;
  std::string expected_message;
};

void PrintTo(const MalformedCase& c, std::ostream* os) { *os << c.name; }

std::vector<MalformedCase> corpus() {
  const std::string f32x2 = R"("dtype":"F32","shape":[2])";
  return {
      {"empty", "", "shorter than the 8-byte header length"},
      {"five_bytes", "\x01\x02\x03\x04\x05", "shorter than the 8-byte header length"},
      {"length_past_end", raw_length(1000, "{}"), "larger than the file"},
      {"length_over_cap", raw_length(200'000'000, std::string(16, ' ')), "exceeds the 100,000,000-byte limit"},
      {"not_an_object_start", with_length_prefix("[1,2]"), "does not start with '{'"},
      {"invalid_json", with_length_prefix("{\"a\":"), "not valid JSON"},
      {"invalid_utf8", with_length_prefix("{\"\xff\xfe\":{}}"), "not valid JSON"},
      {"duplicate_tensor", with_length_prefix(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,8]},"w":{)" + f32x2 + R"(,"data_offsets":[8,16]}})", std::string(16, '\0')), "duplicate key 'w'"},
      {"entry_not_object", with_length_prefix(R"({"w":[1]})"), "entry is not a JSON object"},
      {"missing_dtype", with_length_prefix(R"({"w":{"shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')), "missing 'dtype'"},
      {"unknown_dtype", with_length_prefix(R"({"w":{"dtype":"F128","shape":[2],"data_offsets":[0,8]}})", std::string(8, '\0')), "unsupported dtype 'F128'"},
      {"complex_dtype", with_length_prefix(R"({"w":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}})", std::string(8, '\0')), "unsupported dtype 'C64'"},
      {"negative_dim", with_length_prefix(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", std::string(8, '\0')), "negative value"},
      {"float_dim", with_length_prefix(R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", std::string(8, '\0')), "non-negative integers"},
      {"shape_product_overflow", with_length_prefix(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})", std::string(8, '\0')), "overflows"},
      {"size_mismatch", with_length_prefix(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", std::string(8, '\0')), "12 bytes but data_offsets span 8 bytes"},
      {"offsets_reversed", with_length_prefix(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", std::string(8, '\0')), "end is before begin"},
      {"offsets_arity", with_length_prefix(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", std::string(8, '\0')), "data_offsets must be an array [begin, end]"},
      {"past_buffer_end", with_length_prefix(R"({"w":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", std::string(4, '\0')), "reach past the end of the data buffer"},
      {"overlap", with_length_prefix(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]},"b":{)" + f32x2 + R"(,"data_offsets":[4,12]}})", std::string(12, '\0')), "overlap"},
      {"gap", with_length_prefix(R"({"a":{)" + f32x2 + R"(,"data_offsets":[8,16]}})", std::string(16, '\0')), "gap in the data buffer"},
      {"trailing_bytes", with_length_prefix(R"({"a":{)" + f32x2 + R"(,"data_offsets":[0,8]}})", std::string(12, '\0')), "trailing bytes"},
      {"metadata_not_string", with_length_prefix(R"({"__metadata__":{"format":1}})"), "__metadata__ value 'format' is not a string"},
      {"metadata_not_object", with_length_prefix(R"({"__metadata__":"pt"})"), "__metadata__ is not a JSON object"},
  };
}

class MalformedSafetensors : public ::testing::TestWithParam<MalformedCase> {};

TEST_P(MalformedSafetensors, IsRejectedWithAMessageNamingTheFile) {
  const MalformedCase& c = GetParam();
  auto path = sdtrain::testing::scratch_dir() / (c.name + ".safetensors");
  std::ofstream(path, std::ios::binary) << c.bytes;

  for (int reader = 0; reader < 2; ++reader) {
    try {
      if (reader == 0) read_safetensors_header(path);
      else SafetensorsFile file(path);
      FAIL() << c.name << " was accepted by reader " << reader;
    } catch (const ModelError& e) {
      std::string message = e.what();
      EXPECT_NE(message.find(path.string()), std::string::npos) << message;
      EXPECT_NE(message.find(c.expected_message), std::string::npos)
          << "reader " << reader << ": " << message;
      EXPECT_EQ(e.code(), ExitCode::model);
      // Quoted file content never reaches the terminal raw (invalid UTF-8, control bytes).
      EXPECT_TRUE(is_valid_utf8(message)) << message;
    }
  }
}

TEST(Safetensors, AnInvalidUtf8HeaderGivesAValidUtf8MessageNamingTheFileThroughTheExecutable) {
  const auto path = sdtrain::testing::scratch_dir() / "bad.safetensors";
  std::ofstream(path, std::ios::binary) << with_length_prefix("{\"\xff\xfe\x1b[2J\":{}}");
  const auto result = sdtrain::testing::run_sdtrain("inspect " + path.string());
  EXPECT_EQ(result.code, 3) << result.output;
  EXPECT_TRUE(is_valid_utf8(result.output)) << result.output;
  EXPECT_EQ(result.output.find('\x1b'), std::string::npos) << "a terminal escape reached the output";
  EXPECT_NE(result.output.find(path.string()), std::string::npos) << result.output;
}

INSTANTIATE_TEST_SUITE_P(Corpus, MalformedSafetensors, ::testing::ValuesIn(corpus()),
                         [](const auto& info) { return info.param.name; });

TEST(Safetensors, AcceptsEmptyHeaderAndEmptyTensors) {
  auto dir = sdtrain::testing::scratch_dir();
  std::ofstream(dir / "empty.safetensors", std::ios::binary) << with_length_prefix("{}");
  EXPECT_TRUE(SafetensorsFile(dir / "empty.safetensors").tensors().empty());
  // Zero-length tensors may share an offset; spaces may pad the header.
  std::ofstream(dir / "zeros.safetensors", std::ios::binary)
      << with_length_prefix(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},"b":{"dtype":"U8","shape":[0,3],"data_offsets":[0,0]}}   )");
  SafetensorsFile zeros(dir / "zeros.safetensors");
  EXPECT_EQ(zeros.tensor("b").sizes(), (std::vector<int64_t>{0, 3}));
}

TEST(Safetensors, ReadsAnUnalignedTensorByCopying) {
  auto dir = sdtrain::testing::scratch_dir();
  // A one-byte tensor first puts the F32 tensor at an odd offset.
  std::string header = R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"b":{"dtype":"F32","shape":[1],"data_offsets":[1,5]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  float value = 2.5f;
  std::string data(1, '\x07');
  data.append(reinterpret_cast<const char*>(&value), 4);
  std::ofstream(dir / "odd.safetensors", std::ios::binary) << with_length_prefix(header, data);
  SafetensorsFile file(dir / "odd.safetensors");
  EXPECT_FALSE(file.is_zero_copy("b"));
  EXPECT_FLOAT_EQ(file.tensor("b").item<float>(), 2.5f);
  EXPECT_EQ(file.tensor("a").item<uint8_t>(), 7);
}

}  // namespace
