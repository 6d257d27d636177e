#pragma once
// Errors carry the exit code that main() returns for them (README "Exit codes").
// Code below main() throws; main() catches once, prints the message and returns the code.

#include <stdexcept>
#include <string>

namespace sdtrain {

enum class ExitCode : int {
  success = 0,
  usage = 1,           // command line or configuration
  input_data = 2,      // instance/class images, dataset_info.json
  model = 3,           // model folder or weight files
  out_of_memory = 4,   // GPU memory exhausted
  output = 5,          // an output could not be written (disk full, permissions)
  training_diverged = 6,  // inf/NaN loss or gradients without loss scaling
  subjects_failed = 7,    // a subjects run: one or more subjects failed (see its summary)
  peer_lost = 8,          // data parallel: another process of the run stopped or went silent
  interrupted_sigint = 130,
  interrupted_sigterm = 143,
};

class Error : public std::runtime_error {
 public:
  Error(ExitCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ExitCode code() const { return code_; }

 private:
  ExitCode code_;
};

class ConfigError : public Error {
 public:
  explicit ConfigError(const std::string& message) : Error(ExitCode::usage, message) {}
};

class InputDataError : public Error {
 public:
  explicit InputDataError(const std::string& message) : Error(ExitCode::input_data, message) {}
};

class ModelError : public Error {
 public:
  explicit ModelError(const std::string& message) : Error(ExitCode::model, message) {}
};

class OutputError : public Error {
 public:
  explicit OutputError(const std::string& message) : Error(ExitCode::output, message) {}
};

}  // namespace sdtrain
