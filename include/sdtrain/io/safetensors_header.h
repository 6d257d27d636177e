#pragma once
// Parsing and validation of a safetensors header, kept free of LibTorch so that it can be
// fuzzed on its own. Format: u64 little-endian header length N, N bytes of JSON, then the
// byte buffer. The rules follow the reference implementation (huggingface/safetensors):
// known dtypes, shape x element size == byte range, offsets inside the buffer, no overlap and
// no hole (the buffer is exactly covered), no duplicate names, header at most 100 MB.

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace sdtrain::io {

enum class SafetensorsDtype {
  F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2,
};

// Name as written in the header ("F32", "BF16", ...).
std::string_view dtype_name(SafetensorsDtype dtype);
std::size_t dtype_size(SafetensorsDtype dtype);

struct TensorEntry {
  std::string name;
  SafetensorsDtype dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the byte buffer, end exclusive
  uint64_t end = 0;
  int64_t numel() const;
};

struct SafetensorsHeader {
  uint64_t header_length = 0;    // N, the JSON length
  uint64_t data_offset = 0;      // 8 + N: where the byte buffer starts in the file
  std::vector<TensorEntry> tensors;  // sorted by name
  std::map<std::string, std::string> metadata;
};

// Largest header the reference implementation accepts.
inline constexpr uint64_t kMaxSafetensorsHeaderLength = 100'000'000;

// Parses and validates the header of a whole safetensors file, given its first bytes (at
// least 8 + N of them, or all of them if the file is shorter) and the file's total size.
// Throws ModelError naming `source` (a file name) and, where one is at fault, the tensor.
SafetensorsHeader parse_safetensors_header(std::string_view file_prefix, uint64_t file_size,
                                           const std::string& source);

// Reads only the 8-byte length prefix; throws ModelError if the file is too short or the
// length is out of range.
uint64_t read_safetensors_header_length(std::string_view first_bytes, uint64_t file_size,
                                        const std::string& source);

}  // namespace sdtrain::io
