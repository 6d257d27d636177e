#include "sdtrain/io/safetensors_header.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "sdtrain/util/error.h"
#include "sdtrain/util/text.h"

namespace sdtrain::io {
namespace {

struct DtypeInfo {
  SafetensorsDtype dtype;
  std::string_view name;
  std::size_t size;
};

constexpr std::array<DtypeInfo, 12> kDtypes{{
    {SafetensorsDtype::F64, "F64", 8},       {SafetensorsDtype::F32, "F32", 4},
    {SafetensorsDtype::F16, "F16", 2},       {SafetensorsDtype::BF16, "BF16", 2},
    {SafetensorsDtype::I64, "I64", 8},       {SafetensorsDtype::I32, "I32", 4},
    {SafetensorsDtype::I16, "I16", 2},       {SafetensorsDtype::I8, "I8", 1},
    {SafetensorsDtype::U8, "U8", 1},         {SafetensorsDtype::BOOL, "BOOL", 1},
    {SafetensorsDtype::F8_E4M3, "F8_E4M3", 1}, {SafetensorsDtype::F8_E5M2, "F8_E5M2", 1},
}};

const DtypeInfo& info_of(SafetensorsDtype dtype) {
  return kDtypes[static_cast<std::size_t>(dtype)];
}

[[noreturn]] void fail(const std::string& source, const std::string& what) {
  throw ModelError(source + ": invalid safetensors file: " + what);
}

[[noreturn]] void fail_tensor(const std::string& source, const std::string& tensor,
                              const std::string& what) {
  fail(source, "tensor '" + tensor + "': " + what);
}

// nlohmann keeps the last of duplicate keys silently; the reference implementation rejects
// them, so the parse callback tracks the keys of every open object.
nlohmann::json parse_rejecting_duplicate_keys(std::string_view text, const std::string& source) {
  std::vector<std::set<std::string>> open_objects;
  auto callback = [&](int /*depth*/, nlohmann::json::parse_event_t event,
                      nlohmann::json& parsed) {
    using Event = nlohmann::json::parse_event_t;
    if (event == Event::object_start) {
      open_objects.emplace_back();
    } else if (event == Event::object_end) {
      if (!open_objects.empty()) open_objects.pop_back();
    } else if (event == Event::key && !open_objects.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) fail(source, "duplicate key '" + key + "' in header");
    }
    return true;
  };
  try {
    return nlohmann::json::parse(text.begin(), text.end(), callback);
  } catch (const nlohmann::json::exception& e) {
    fail(source, std::string("header is not valid JSON (") + printable(e.what()) + ")");
  }
}

uint64_t as_unsigned(const nlohmann::json& value, const std::string& source,
                     const std::string& tensor, const char* field) {
  if (!value.is_number_unsigned()) {
    if (value.is_number_integer()) fail_tensor(source, tensor, std::string(field) + " has a negative value");
    fail_tensor(source, tensor, std::string(field) + " must hold non-negative integers");
  }
  return value.get<uint64_t>();
}

TensorEntry parse_entry(const std::string& name, const nlohmann::json& value,
                        const std::string& source) {
  if (!value.is_object()) fail_tensor(source, name, "entry is not a JSON object");
  for (const char* field : {"dtype", "shape", "data_offsets"}) {
    if (!value.contains(field)) fail_tensor(source, name, std::string("missing '") + field + "'");
  }
  TensorEntry entry;
  entry.name = name;

  const auto& dtype = value["dtype"];
  if (!dtype.is_string()) fail_tensor(source, name, "dtype is not a string");
  const auto& dtype_text = dtype.get_ref<const std::string&>();
  auto known = std::find_if(kDtypes.begin(), kDtypes.end(),
                            [&](const DtypeInfo& d) { return d.name == dtype_text; });
  if (known == kDtypes.end()) {
    fail_tensor(source, name, "unsupported dtype '" + dtype_text +
                                  "' (supported: F64 F32 F16 BF16 I64 I32 I16 I8 U8 BOOL F8_E4M3 F8_E5M2)");
  }
  entry.dtype = known->dtype;

  const auto& shape = value["shape"];
  if (!shape.is_array()) fail_tensor(source, name, "shape is not an array");
  uint64_t numel = 1;
  for (const auto& dim : shape) {
    uint64_t d = as_unsigned(dim, source, name, "shape");
    if (d > static_cast<uint64_t>(INT64_MAX) || __builtin_mul_overflow(numel, d, &numel)) {
      fail_tensor(source, name, "shape product overflows");
    }
    entry.shape.push_back(static_cast<int64_t>(d));
  }

  const auto& offsets = value["data_offsets"];
  if (!offsets.is_array() || offsets.size() != 2) {
    fail_tensor(source, name, "data_offsets must be an array [begin, end]");
  }
  entry.begin = as_unsigned(offsets[0], source, name, "data_offsets");
  entry.end = as_unsigned(offsets[1], source, name, "data_offsets");
  if (entry.end < entry.begin) fail_tensor(source, name, "data_offsets end is before begin");

  uint64_t nbytes = 0;
  if (__builtin_mul_overflow(numel, static_cast<uint64_t>(known->size), &nbytes) ||
      nbytes > static_cast<uint64_t>(INT64_MAX)) {
    fail_tensor(source, name, "byte size overflows");
  }
  if (nbytes != entry.end - entry.begin) {
    std::ostringstream msg;
    msg << "shape x dtype size is " << nbytes << " bytes but data_offsets span "
        << (entry.end - entry.begin) << " bytes";
    fail_tensor(source, name, msg.str());
  }
  return entry;
}

void check_buffer_coverage(std::vector<TensorEntry> entries, uint64_t buffer_size,
                           const std::string& source) {
  std::sort(entries.begin(), entries.end(), [](const TensorEntry& a, const TensorEntry& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t expected = 0;
  for (const auto& entry : entries) {
    if (entry.end > buffer_size) {
      std::ostringstream msg;
      msg << "data_offsets [" << entry.begin << ", " << entry.end
          << ") reach past the end of the data buffer (" << buffer_size
          << " bytes; is the file truncated?)";
      fail_tensor(source, entry.name, msg.str());
    }
    if (entry.begin != expected) {
      fail_tensor(source, entry.name, entry.begin < expected
                                          ? "its bytes overlap another tensor's"
                                          : "there is a gap in the data buffer before it");
    }
    expected = entry.end;
  }
  if (expected != buffer_size) {
    std::ostringstream msg;
    msg << "the tensors cover " << expected << " bytes but the data buffer holds " << buffer_size
        << " (trailing bytes)";
    fail(source, msg.str());
  }
}

}  // namespace

std::string_view dtype_name(SafetensorsDtype dtype) { return info_of(dtype).name; }
std::size_t dtype_size(SafetensorsDtype dtype) { return info_of(dtype).size; }

int64_t TensorEntry::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

uint64_t read_safetensors_header_length(std::string_view first_bytes, uint64_t file_size,
                                        const std::string& source) {
  if (file_size < 8 || first_bytes.size() < 8) {
    fail(source, "file is shorter than the 8-byte header length");
  }
  uint64_t length = 0;
  for (int i = 7; i >= 0; --i) length = (length << 8) | static_cast<unsigned char>(first_bytes[i]);
  if (length > kMaxSafetensorsHeaderLength) {
    fail(source, "header length " + std::to_string(length) + " exceeds the 100,000,000-byte limit");
  }
  if (length > file_size - 8) {
    fail(source, "header length " + std::to_string(length) + " is larger than the file (" +
                     std::to_string(file_size) + " bytes; is it truncated?)");
  }
  return length;
}

SafetensorsHeader parse_safetensors_header(std::string_view file_prefix, uint64_t file_size,
                                           const std::string& source) {
  SafetensorsHeader header;
  header.header_length = read_safetensors_header_length(file_prefix, file_size, source);
  header.data_offset = 8 + header.header_length;
  if (file_prefix.size() < header.data_offset) fail(source, "header bytes were not all read");
  std::string_view text = file_prefix.substr(8, header.header_length);
  if (text.empty() || text.front() != '{') fail(source, "header does not start with '{'");

  nlohmann::json json = parse_rejecting_duplicate_keys(text, source);
  if (!json.is_object()) fail(source, "header is not a JSON object");

  for (const auto& [key, value] : json.items()) {
    if (key == "__metadata__") {
      if (!value.is_object()) fail(source, "__metadata__ is not a JSON object");
      for (const auto& [meta_key, meta_value] : value.items()) {
        if (!meta_value.is_string()) fail(source, "__metadata__ value '" + meta_key + "' is not a string");
        header.metadata[meta_key] = meta_value.get<std::string>();
      }
      continue;
    }
    header.tensors.push_back(parse_entry(key, value, source));
  }
  check_buffer_coverage(header.tensors, file_size - header.data_offset, source);
  std::sort(header.tensors.begin(), header.tensors.end(),
            [](const TensorEntry& a, const TensorEntry& b) { return a.name < b.name; });
  return header;
}

}  // namespace sdtrain::io
