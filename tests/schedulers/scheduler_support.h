#pragma once
// Fixtures of tools/make_scheduler_fixtures.py and the comparisons the sampler tests share.

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <ATen/Version.h>

#include <map>
#include <string>

#include "sdtrain/io/safetensors.h"
#include "sdtrain/schedulers/scheduler_config.h"
#include "test_support.h"

namespace sdtrain::testing {

inline const char* kRegenerateSchedulerFixtures =
    "the fixtures come from the reference environment; regenerate them with\n"
    "  ~/.cache/sdtrain/venv/bin/python tools/make_scheduler_fixtures.py\n"
    "(and commit tests/fixtures/schedulers/)";

inline std::map<std::string, torch::Tensor> read_scheduler_fixture(const std::string& file) {
  const auto path = fixture("schedulers/" + file);
  if (!std::filesystem::exists(path)) ADD_FAILURE() << path << " is missing: " << kRegenerateSchedulerFixtures;
  io::SafetensorsFile reader(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& entry : reader.tensors()) out.emplace(entry.name, reader.tensor(entry.name).clone());
  return out;
}

inline schedulers::SchedulerConfig scheduler_fixture_config(const std::string& name) {
  return schedulers::SchedulerConfig::from_file(fixture("schedulers/" + name + ".json"));
}

// The largest distance in units in the last place between two float32 tensors of one shape:
// 0 for bit equality, 1 for neighbouring floats (across zero, +0 and -0 count as one value).
inline int64_t max_ulp_distance(const torch::Tensor& actual, const torch::Tensor& expected) {
  EXPECT_EQ(actual.sizes(), expected.sizes());
  if (actual.sizes() != expected.sizes() || actual.numel() == 0) return actual.numel() == 0 ? 0 : INT64_MAX;
  auto ordered = [](const torch::Tensor& t) {
    const torch::Tensor bits = t.detach().cpu().to(torch::kFloat32).contiguous().view(torch::kInt32).to(torch::kLong);
    return torch::where(bits < 0, -(bits & 0x7fffffff), bits);  // monotone in the float's value
  };
  return (ordered(actual) - ordered(expected)).abs().max().item<int64_t>();
}

// The CPU capability ATen dispatches to ("DEFAULT", "AVX2", "AVX512"; ATEN_CPU_CAPABILITY
// overrides it). The sampler fixtures were recorded under AVX2 (docs/parity.md).
inline std::string cpu_capability() { return at::get_cpu_capability(); }

// max |a - b| / max(max |b|, floor), in float64.
inline double relative_difference(const torch::Tensor& actual, const torch::Tensor& expected, double floor = 1e-12) {
  EXPECT_EQ(actual.sizes(), expected.sizes());
  if (actual.sizes() != expected.sizes()) return INFINITY;
  auto a = actual.detach().cpu().to(torch::kDouble), e = expected.detach().cpu().to(torch::kDouble);
  const double scale = std::max(e.abs().max().item<double>(), floor);
  return (a - e).abs().max().item<double>() / scale;
}

}  // namespace sdtrain::testing
