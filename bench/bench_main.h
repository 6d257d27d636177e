#pragma once
// The main() of a bench program that reports errors as sdtrain does: the message on stderr,
// after the program's name, and sdtrain's exit code for its errors (1 for any other).

#include <exception>
#include <iostream>

#include "sdtrain/util/error.h"

template <typename Run>
int run_reporting_errors(const char* program, Run&& run) {
  try {
    return run();
  } catch (const sdtrain::Error& error) {
    std::cerr << program << ": " << error.what() << "\n";
    return static_cast<int>(error.code());
  } catch (const std::exception& error) {
    std::cerr << program << ": " << error.what() << "\n";
    return 1;
  }
}
