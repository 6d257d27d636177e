// OutputLock: one holder per folder, the holder named to the second; released with the holder
// (here: its descriptor, as the kernel does when a killed process's descriptors close).
// remove_leftovers: what a killed run leaves, cleared; a folder moved aside is put back.
#include <gtest/gtest.h>
#include <unistd.h>

#include <fstream>

#include "sdtrain/util/error.h"
#include "sdtrain/util/output_lock.h"
#include "test_support.h"

namespace fs = std::filesystem;

namespace sdtrain {
namespace {

TEST(OutputLock, ASecondHolderIsRefusedNamingTheFirstUntilItIsReleased) {
  const fs::path dir = testing::scratch_dir() / "out";
  {
    OutputLock first(dir);
    try {
      OutputLock second(dir);
      FAIL() << "the second lock was granted";
    } catch (const ConfigError& error) {
      const std::string message = error.what();
      EXPECT_NE(message.find("in use by another sdtrain run"), std::string::npos) << message;
      EXPECT_NE(message.find("pid " + std::to_string(::getpid())), std::string::npos) << message;
      EXPECT_NE(message.find(dir.string()), std::string::npos) << message;
    }
  }
  EXPECT_NO_THROW(OutputLock again(dir));
}

TEST(OutputLock, AnUnwritableFolderIsAnOutputError) {
  if (::geteuid() == 0) {
    // root ignores permission bits; use a path under a regular file instead
    const fs::path file = testing::scratch_dir() / "file";
    std::ofstream(file) << "x";
    EXPECT_THROW(OutputLock lock(file / "out"), OutputError);
    return;
  }
  const fs::path dir = testing::scratch_dir() / "ro";
  fs::create_directories(dir);
  fs::permissions(dir, fs::perms::owner_read | fs::perms::owner_exec);
  EXPECT_THROW(OutputLock lock(dir / "out"), OutputError);
}

TEST(RemoveLeftovers, ClearsTemporaryFilesAndStagingFoldersAndRestoresAMovedFolder) {
  const fs::path dir = testing::scratch_dir();
  fs::create_directories(dir / "logs");
  fs::create_directories(dir / ".checkpoint-4.partial.1234" / "unet");
  fs::create_directories(dir / ".checkpoint-2.partial");  // the name sdtrain 0.1 used
  fs::create_directories(dir / ".unet.old.99");           // killed between publish's renames
  std::ofstream(dir / ".unet.old.99" / "weights") << "previous";
  fs::create_directories(dir / "vae");
  fs::create_directories(dir / ".vae.old.99");             // the replacement arrived: stale
  std::ofstream(dir / "logs" / "metrics.jsonl.tmp.4321") << "torn";
  std::ofstream(dir / "logs" / "metrics.jsonl") << "{}\n";
  std::ofstream(dir / "model_index.json") << "{}";

  const auto removed = remove_leftovers(dir);
  EXPECT_EQ(removed.size(), 4u);
  EXPECT_FALSE(fs::exists(dir / ".checkpoint-4.partial.1234"));
  EXPECT_FALSE(fs::exists(dir / ".checkpoint-2.partial"));
  EXPECT_FALSE(fs::exists(dir / ".vae.old.99"));
  EXPECT_FALSE(fs::exists(dir / "logs" / "metrics.jsonl.tmp.4321"));
  EXPECT_TRUE(fs::exists(dir / "unet" / "weights"));
  EXPECT_TRUE(fs::exists(dir / "logs" / "metrics.jsonl"));
  EXPECT_TRUE(fs::exists(dir / "model_index.json"));
  EXPECT_TRUE(fs::exists(dir / "vae"));
}

}  // namespace
}  // namespace sdtrain
