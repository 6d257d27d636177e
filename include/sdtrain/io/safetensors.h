#pragma once
// safetensors files as LibTorch tensors. Reading memory-maps the file (copy-on-write, so a
// tensor that is written to never touches the file) and hands out tensors that view the
// mapping without a copy when the data is aligned for its dtype. Writing goes through
// AtomicFile: a crash never leaves a half-written file.

#include <torch/torch.h>

#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "sdtrain/io/safetensors_header.h"

namespace sdtrain::io {

c10::ScalarType to_scalar_type(SafetensorsDtype dtype);
SafetensorsDtype to_safetensors_dtype(c10::ScalarType type);  // throws for unsupported types

// Reads and validates only the header (8 + N bytes), for inspect and dry runs.
SafetensorsHeader read_safetensors_header(const std::filesystem::path& path);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const SafetensorsHeader& header() const { return header_; }
  const std::vector<TensorEntry>& tensors() const { return header_.tensors; }
  const std::map<std::string, std::string>& metadata() const { return header_.metadata; }
  const TensorEntry* find(const std::string& name) const;

  // CPU tensor over the mapped bytes (zero copy when aligned; the tensor keeps the mapping
  // alive), or an aligned copy otherwise. Throws ModelError for an unknown name.
  torch::Tensor tensor(const std::string& name) const;
  // True when tensor(name) can view the mapping without copying.
  bool is_zero_copy(const std::string& name) const;

 private:
  struct Mapping;
  std::filesystem::path path_;
  std::shared_ptr<Mapping> mapping_;
  SafetensorsHeader header_;
};

using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// Writes `tensors` (any device; copied to CPU one at a time) with metadata
// {"format": "pt"} plus `metadata`. Tensors are laid out as the reference writer does
// (descending alignment, then name); the header is padded to a multiple of 8 bytes.
void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata = {});

}  // namespace sdtrain::io
