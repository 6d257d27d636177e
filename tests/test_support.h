#pragma once
// Helpers shared by every test binary: repository paths, scratch directories, and the
// reference Python environment (tests that need it skip, visibly, when it is absent).

#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "sdtrain/io/safetensors.h"

namespace sdtrain::testing {

std::filesystem::path source_dir();
std::filesystem::path fixture(const std::string& relative);  // tests/fixtures/<relative>
// A fresh, empty directory under the build tree, unique to the running test.
std::filesystem::path scratch_dir();
// The reference environment's python, or "" when it is not configured.
std::string reference_python();
// Runs a command through the shell; returns its exit status and captures stdout+stderr.
int run_command(const std::string& command, std::string* output = nullptr);
// The sdtrain executable under test.
std::string sdtrain_exe();
// Runs `sdtrain <args>`: its exit status and its stdout+stderr.
struct CommandResult {
  int code = 0;
  std::string output;
};
CommandResult run_sdtrain(const std::string& args);
// Runs `action`, which must throw a ModelError (exit code 3) whose message contains every
// string of `needles`: the check of "a bad model folder fails naming what is wrong".
void expect_model_error(const std::function<void()>& action, const std::vector<std::string>& needles);
// A copy of the folder `source` in this test's scratch directory whose safetensors file
// `weights` (relative to the folder) holds the tensors after `edit` changed them.
std::filesystem::path edited_copy(const std::filesystem::path& source, const std::string& weights,
                                  const std::function<void(io::NamedTensors&)>& edit);

}  // namespace sdtrain::testing
