// libFuzzer target for the safetensors header parser: any input must either be rejected with a
// ModelError or be accepted with every invariant the loader relies on holding.

#include <cstdint>
#include <string_view>

#include "sdtrain/io/safetensors_header.h"
#include "sdtrain/util/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  try {
    auto header = sdtrain::io::parse_safetensors_header(bytes, size, "fuzz-input");
    const uint64_t buffer = size - header.data_offset;
    uint64_t covered = 0;
    for (const auto& tensor : header.tensors) {
      uint64_t nbytes = static_cast<uint64_t>(tensor.numel()) * sdtrain::io::dtype_size(tensor.dtype);
      if (tensor.end > buffer || tensor.begin > tensor.end || nbytes != tensor.end - tensor.begin) __builtin_trap();
      covered += nbytes;
    }
    if (covered != buffer) __builtin_trap();
  } catch (const sdtrain::ModelError&) {
  }
  return 0;
}
