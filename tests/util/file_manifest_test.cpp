// Manifests: a folder whose files all match verifies; one flipped byte, a truncated, missing
// or extra file, or no manifest at all is reported naming the file.
#include <gtest/gtest.h>

#include <fstream>

#include "sdtrain/util/file_manifest.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace sdtrain {
namespace {

fs::path sample_folder() {
  const fs::path dir = testing::scratch_dir() / "checkpoint-3";
  fs::create_directories(dir / "unet");
  std::ofstream(dir / "trainer_state.json") << R"({"global_step": 3})";
  std::string weights(3 << 20, '\0');
  for (std::size_t i = 0; i < weights.size(); ++i) weights[i] = static_cast<char>(i * 2654435761u >> 24);
  std::ofstream(dir / "unet" / "weights.safetensors", std::ios::binary) << weights;
  write_manifest(dir);
  return dir;
}

void flip_byte(const fs::path& file, std::streamoff offset) {
  std::fstream stream(file, std::ios::in | std::ios::out | std::ios::binary);
  stream.seekg(offset);
  char byte = 0;
  stream.get(byte);
  stream.seekp(offset);
  stream.put(static_cast<char>(byte ^ 0x01));
}

TEST(FileManifest, AWholeFolderVerifies) {
  const fs::path dir = sample_folder();
  EXPECT_EQ(verify_manifest(dir), std::nullopt);
  EXPECT_EQ(hash_file(dir / "trainer_state.json").size(), 32u);  // 128 bits in hex
}

TEST(FileManifest, OneFlippedBitIsFoundAndTheFileNamed) {
  const fs::path dir = sample_folder();
  flip_byte(dir / "unet" / "weights.safetensors", 2'000'000);
  const auto problem = verify_manifest(dir);
  ASSERT_TRUE(problem.has_value());
  EXPECT_NE(problem->find("unet/weights.safetensors"), std::string::npos) << *problem;
}

TEST(FileManifest, TruncatedMissingAddedFilesAndAMissingManifestAreFound) {
  fs::path dir = sample_folder();
  fs::resize_file(dir / "unet" / "weights.safetensors", 1000);
  EXPECT_NE(verify_manifest(dir).value_or("").find("has 1000 bytes"), std::string::npos);

  dir = sample_folder();
  fs::remove(dir / "trainer_state.json");
  EXPECT_NE(verify_manifest(dir).value_or("").find("trainer_state.json is missing"), std::string::npos);

  dir = sample_folder();
  std::ofstream(dir / "unet" / "extra.bin") << "x";
  EXPECT_NE(verify_manifest(dir).value_or("").find("extra.bin is not listed"), std::string::npos);

  dir = sample_folder();
  fs::remove(dir / kManifestFile);
  EXPECT_NE(verify_manifest(dir).value_or("").find("manifest.json is missing"), std::string::npos);

  dir = sample_folder();
  std::ofstream(dir / kManifestFile) << "{\"files\": [";
  EXPECT_NE(verify_manifest(dir).value_or("").find("not a valid manifest"), std::string::npos);
}

}  // namespace
}  // namespace sdtrain
