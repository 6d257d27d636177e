#pragma once
// Helpers of the UNet/VAE tests: the fixtures written by tools/make_unet_vae_fixtures.py,
// tensor comparison, and a CPU live-memory counter for the checkpointing test.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>

#include "sdtrain/io/safetensors.h"
#include "test_support.h"

namespace sdtrain::testing {

inline const char* kRegenerateFixtures =
    "the fixtures come from the reference environment; regenerate them with\n"
    "  ~/.cache/sdtrain/venv/bin/python tools/make_unet_vae_fixtures.py\n"
    "(and commit tests/fixtures/models/)";

inline std::filesystem::path model_fixture(const std::string& name) {
  auto path = fixture("models/" + name);
  EXPECT_TRUE(std::filesystem::exists(path)) << path << " is missing: " << kRegenerateFixtures;
  return path;
}

// All tensors of a fixture file, by name.
inline std::map<std::string, torch::Tensor> read_fixture_tensors(const std::string& name) {
  io::SafetensorsFile file(model_fixture(name));
  std::map<std::string, torch::Tensor> out;
  for (const auto& entry : file.tensors()) out.emplace(entry.name, file.tensor(entry.name).clone());
  return out;
}

struct Difference {
  double max_abs = 0;  // max |actual - expected|
  double max_ref = 0;  // max |expected|
  double relative() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
};

inline Difference difference(const torch::Tensor& actual, const torch::Tensor& expected) {
  EXPECT_EQ(actual.sizes(), expected.sizes());
  Difference d;
  if (actual.sizes() != expected.sizes()) {
    d.max_abs = INFINITY;
    return d;
  }
  auto a = actual.detach().to(torch::kDouble), e = expected.detach().to(torch::kDouble);
  d.max_abs = (a - e).abs().max().item<double>();
  d.max_ref = e.abs().max().item<double>();
  return d;
}

inline std::string describe(const Difference& d) {
  std::ostringstream out;
  out << "max|a-b| = " << d.max_abs << ", max|ref| = " << d.max_ref << ", ratio = " << d.relative() << "\n"
      << kRegenerateFixtures;
  return out.str();
}

// "key<TAB>[d0, d1, ...]" lines of tests/fixtures/configs/keys_*.txt -> key -> shape text.
inline std::map<std::string, std::string> read_key_list(const std::string& name) {
  std::ifstream in(fixture("configs/" + name));
  EXPECT_TRUE(in.good()) << name;
  std::map<std::string, std::string> keys;
  std::string line;
  while (std::getline(in, line)) {
    auto tab = line.find('\t');
    if (tab != std::string::npos) keys[line.substr(0, tab)] = line.substr(tab + 1);
  }
  return keys;
}

inline std::string shape_text(c10::IntArrayRef sizes) {
  std::string text = "[";
  for (std::size_t i = 0; i < sizes.size(); ++i) text += (i ? ", " : "") + std::to_string(sizes[i]);
  return text + "]";
}

// Counts CPU bytes allocated and not yet freed while it is installed (through c10's memory
// reporting hook, which the CPU allocator calls for every allocation and free when a reporter
// with profiling enabled is installed on the thread).
class LiveCPUBytes : public c10::MemoryReportingInfoBase {
 public:
  void reportMemoryUsage(void*, int64_t alloc_size, size_t, size_t, c10::Device device) override {
    if (!device.is_cpu()) return;
    current += alloc_size;
    peak = std::max(peak, current);
  }
  bool memoryProfilingEnabled() const override { return true; }
  int64_t current = 0;
  int64_t peak = 0;
};

}  // namespace sdtrain::testing
