#pragma once
// Reading environment variables through a function, so that what a launcher sets (Slurm,
// AWS Batch, Kubernetes, torchrun) can be given by a test without touching the process's own.

#include <cstdlib>
#include <functional>

namespace sdtrain {

// The value of a variable, or null when it is unset.
using EnvironmentLookup = std::function<const char*(const char*)>;

inline EnvironmentLookup process_environment() {
  return [](const char* name) -> const char* { return std::getenv(name); };
}

}  // namespace sdtrain
