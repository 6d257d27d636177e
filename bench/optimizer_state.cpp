// Optimizer-state memory for a model's parameter list: AdamW (fp32 states) vs 8-bit AdamW
// (uint8 states + per-256-block absmax; tensors under 4096 elements keep fp32 states).
//
//   bench_optimizer_state KEYS_FILE [min_8bit_size]
// KEYS_FILE: one tensor per line, "name<TAB>[d0, d1, ...]", e.g.
// shared/reference/state-dicts/keys_unet_sd21.txt (SD 2.1-base UNet). Results:
// docs/optimizer.md.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "key_list.h"
#include "sdtrain/optim/optimizer.h"

namespace {

std::vector<int64_t> read_numels(const std::string& path) {
  std::vector<int64_t> numels;
  for (const auto& shape : read_key_list_shapes(path)) {
    int64_t numel = 1;
    for (int64_t d : shape) numel *= d;
    numels.push_back(numel);
  }
  return numels;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: " << argv[0] << " KEYS_FILE [min_8bit_size]\n";
    return 1;
  }
  try {
    const int64_t min_8bit_size = argc > 2 ? std::stoll(argv[2]) : 4096;
    const std::vector<int64_t> numels = read_numels(argv[1]);
    int64_t total = 0;
    int64_t small_tensors = 0;
    int64_t small_elements = 0;
    for (const int64_t n : numels) {
      total += n;
      if (n < min_8bit_size) {
        ++small_tensors;
        small_elements += n;
      }
    }
    const int64_t fp32 = sdtrain::optim::adamw_state_bytes(numels);
    const int64_t eight = sdtrain::optim::adamw8bit_state_bytes(numels, min_8bit_size);
    const double gib = 1024.0 * 1024.0 * 1024.0;
    std::printf("file: %s\n", argv[1]);
    std::printf("tensors: %zu, parameters: %lld\n", numels.size(), static_cast<long long>(total));
    std::printf("tensors under %lld elements (fp32 states): %lld, holding %lld parameters\n",
                static_cast<long long>(min_8bit_size), static_cast<long long>(small_tensors),
                static_cast<long long>(small_elements));
    std::printf("adamw     : %lld bytes (%.3f GiB), %.5f bytes/parameter\n",
                static_cast<long long>(fp32), fp32 / gib, static_cast<double>(fp32) / total);
    std::printf("adamw8bit : %lld bytes (%.3f GiB), %.5f bytes/parameter\n",
                static_cast<long long>(eight), eight / gib, static_cast<double>(eight) / total);
    std::printf("saving    : %.2f%%\n", 100.0 * (1.0 - static_cast<double>(eight) / fp32));
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
