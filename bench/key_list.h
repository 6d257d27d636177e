#pragma once
// Tensor shapes from a state-dict key list ("name<TAB>[d0, d1, ...]" per line, as in
// tests/fixtures/configs/keys_unet_sd21.txt), so benchmarks can size a real model's parameter
// set without its weights.

#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

inline std::vector<std::vector<int64_t>> read_key_list_shapes(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::vector<std::vector<int64_t>> shapes;
  std::string line;
  while (std::getline(in, line)) {
    const auto open = line.find('[');
    const auto close = line.find(']');
    if (open == std::string::npos || close == std::string::npos) continue;
    std::string dims = line.substr(open + 1, close - open - 1);
    for (char& ch : dims) {
      if (ch == ',') ch = ' ';
    }
    std::istringstream parts(dims);
    std::vector<int64_t> shape;
    int64_t d = 0;
    while (parts >> d) shape.push_back(d);
    shapes.push_back(shape);
  }
  return shapes;
}
