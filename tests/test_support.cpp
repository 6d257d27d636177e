#include "test_support.h"

#include <gtest/gtest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <sys/wait.h>

#include "sdtrain/util/error.h"

namespace sdtrain::testing {

namespace paths {  // tests/test_paths.cpp.in
extern const char* const kSourceDir;
extern const char* const kBinaryDir;
extern const char* const kReferencePython;
}  // namespace paths

std::filesystem::path source_dir() { return paths::kSourceDir; }

std::filesystem::path fixture(const std::string& relative) {
  return source_dir() / "tests" / "fixtures" / relative;
}

std::filesystem::path scratch_dir() {
  const auto* info = ::testing::UnitTest::GetInstance()->current_test_info();
  std::string name = info ? std::string(info->test_suite_name()) + "." + info->name() : "scratch";
  auto dir = std::filesystem::path(paths::kBinaryDir) / "test-scratch" / name;
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

std::string reference_python() {
  if (const char* env = std::getenv("SDTRAIN_PYTHON")) return env;
  return paths::kReferencePython;
}

int run_command(const std::string& command, std::string* output) {
  std::string full = command + " 2>&1";
  FILE* pipe = ::popen(full.c_str(), "r");
  if (!pipe) return -1;
  std::array<char, 4096> buffer{};
  std::string captured;
  while (std::size_t n = std::fread(buffer.data(), 1, buffer.size(), pipe)) captured.append(buffer.data(), n);
  int status = ::pclose(pipe);
  if (output) *output = captured;
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

CommandResult run_sdtrain(const std::string& args) {
  CommandResult result;
  result.code = run_command(sdtrain_exe() + " " + args, &result.output);
  return result;
}

std::filesystem::path edited_copy(const std::filesystem::path& source, const std::string& weights,
                                  const std::function<void(io::NamedTensors&)>& edit) {
  auto dir = scratch_dir() / source.filename();
  std::filesystem::copy(source, dir, std::filesystem::copy_options::recursive);
  auto file = dir / weights;
  io::NamedTensors tensors;
  {
    io::SafetensorsFile original(file);
    for (const auto& entry : original.tensors()) tensors.emplace_back(entry.name, original.tensor(entry.name).clone());
  }
  edit(tensors);
  io::save_safetensors(file, tensors);
  return dir;
}

void expect_model_error(const std::function<void()>& action, const std::vector<std::string>& needles) {
  try {
    action();
    ADD_FAILURE() << "expected a ModelError mentioning \"" << needles.front() << "\"";
  } catch (const ModelError& error) {
    EXPECT_EQ(error.code(), ExitCode::model);
    for (const auto& needle : needles) {
      EXPECT_NE(std::string(error.what()).find(needle), std::string::npos)
          << "message lacks \"" << needle << "\":\n" << error.what();
    }
  }
}

std::string sdtrain_exe() {
  if (const char* env = std::getenv("SDTRAIN_EXE")) return env;
  return std::string(paths::kBinaryDir) + "/sdtrain";
}

}  // namespace sdtrain::testing
