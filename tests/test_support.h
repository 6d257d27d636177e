#pragma once
// Helpers shared by every test binary: repository paths, scratch directories, and the
// reference Python environment (tests that need it skip, visibly, when it is absent).

#include <filesystem>
#include <string>

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

}  // namespace sdtrain::testing
