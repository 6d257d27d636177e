#include "sdtrain/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"

namespace sdtrain::io {

static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; sdtrain supports little-endian hosts only");

namespace {

constexpr std::pair<SafetensorsDtype, c10::ScalarType> kScalarTypes[] = {
    {SafetensorsDtype::F64, c10::kDouble},         {SafetensorsDtype::F32, c10::kFloat},
    {SafetensorsDtype::F16, c10::kHalf},           {SafetensorsDtype::BF16, c10::kBFloat16},
    {SafetensorsDtype::I64, c10::kLong},           {SafetensorsDtype::I32, c10::kInt},
    {SafetensorsDtype::I16, c10::kShort},          {SafetensorsDtype::I8, c10::kChar},
    {SafetensorsDtype::U8, c10::kByte},            {SafetensorsDtype::BOOL, c10::kBool},
    {SafetensorsDtype::F8_E4M3, c10::kFloat8_e4m3fn}, {SafetensorsDtype::F8_E5M2, c10::kFloat8_e5m2},
};

std::string errno_text() { return std::strerror(errno); }

}  // namespace

c10::ScalarType to_scalar_type(SafetensorsDtype dtype) {
  for (auto [st, torch_type] : kScalarTypes) {
    if (st == dtype) return torch_type;
  }
  throw ModelError("internal: unmapped safetensors dtype");
}

SafetensorsDtype to_safetensors_dtype(c10::ScalarType type) {
  for (auto [st, torch_type] : kScalarTypes) {
    if (torch_type == type) return st;
  }
  throw Error(ExitCode::output, std::string("safetensors cannot store dtype ") + c10::toString(type));
}

SafetensorsHeader read_safetensors_header(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ModelError("cannot open " + path.string() + ": " + errno_text());
  std::error_code ec;
  uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) throw ModelError("cannot read " + path.string() + ": " + ec.message());
  std::string prefix(std::min<uint64_t>(file_size, 8), '\0');
  in.read(prefix.data(), static_cast<std::streamsize>(prefix.size()));
  uint64_t length = read_safetensors_header_length(prefix, file_size, path.string());
  prefix.resize(8 + length);
  in.read(prefix.data() + 8, static_cast<std::streamsize>(length));
  if (!in) throw ModelError("cannot read the header of " + path.string());
  return parse_safetensors_header(prefix, file_size, path.string());
}

struct SafetensorsFile::Mapping {
  void* data = nullptr;
  std::size_t size = 0;
  ~Mapping() {
    if (data) ::munmap(data, size);
  }
};

SafetensorsFile::SafetensorsFile(const std::filesystem::path& path)
    : path_(path), mapping_(std::make_shared<Mapping>()) {
  int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) throw ModelError("cannot open " + path.string() + ": " + errno_text());
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw ModelError("cannot stat " + path.string() + ": " + errno_text());
  }
  auto file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    read_safetensors_header_length({}, file_size, path.string());  // throws the standard message
  }
  // Private (copy-on-write) mapping: writing to a returned tensor never modifies the file.
  void* data = ::mmap(nullptr, file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (data == MAP_FAILED) throw ModelError("cannot map " + path.string() + ": " + errno_text());
  mapping_->data = data;
  mapping_->size = file_size;
  std::string_view bytes(static_cast<const char*>(data), file_size);
  header_ = parse_safetensors_header(bytes, file_size, path.string());
}

const TensorEntry* SafetensorsFile::find(const std::string& name) const {
  auto it = std::lower_bound(header_.tensors.begin(), header_.tensors.end(), name,
                             [](const TensorEntry& e, const std::string& n) { return e.name < n; });
  return it != header_.tensors.end() && it->name == name ? &*it : nullptr;
}

bool SafetensorsFile::is_zero_copy(const std::string& name) const {
  const TensorEntry* entry = find(name);
  if (!entry || entry->dtype == SafetensorsDtype::BOOL) return false;
  return (header_.data_offset + entry->begin) % dtype_size(entry->dtype) == 0;
}

torch::Tensor SafetensorsFile::tensor(const std::string& name) const {
  const TensorEntry* entry = find(name);
  if (!entry) throw ModelError(path_.string() + ": no tensor named '" + name + "'");
  auto options = torch::TensorOptions().dtype(to_scalar_type(entry->dtype));
  if (entry->numel() == 0) return torch::empty(entry->shape, options);

  char* start = static_cast<char*>(mapping_->data) + header_.data_offset + entry->begin;
  if (entry->dtype == SafetensorsDtype::BOOL) {
    // Any non-zero byte is true; a torch bool must hold exactly 0 or 1.
    auto bytes = torch::from_blob(start, entry->shape, torch::kUInt8);
    return bytes.ne(0);
  }
  if (is_zero_copy(name)) {
    auto keep_alive = mapping_;
    return torch::from_blob(start, entry->shape, [keep_alive](void*) {}, options);
  }
  auto copy = torch::empty(entry->shape, options);
  std::memcpy(copy.data_ptr(), start, entry->end - entry->begin);
  return copy;
}

void save_safetensors(const std::filesystem::path& path, const NamedTensors& tensors,
                      const std::map<std::string, std::string>& metadata) {
  struct Item {
    const std::string* name;
    torch::Tensor tensor;
    SafetensorsDtype dtype;
  };
  std::vector<Item> items;
  items.reserve(tensors.size());
  for (const auto& [name, tensor] : tensors) {
    if (name == "__metadata__") throw Error(ExitCode::output, "a tensor cannot be named __metadata__");
    items.push_back({&name, tensor, to_safetensors_dtype(tensor.scalar_type())});
  }
  // Same order as the reference writer: larger element size first, then by name.
  std::sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
    auto sa = dtype_size(a.dtype), sb = dtype_size(b.dtype);
    return sa != sb ? sa > sb : *a.name < *b.name;
  });
  std::set<std::string_view> names;
  for (const auto& item : items) {
    if (!names.insert(*item.name).second) {
      throw Error(ExitCode::output, "duplicate tensor name '" + *item.name + "' while writing " + path.string());
    }
  }

  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  nlohmann::ordered_json meta = {{"format", "pt"}};
  for (const auto& [key, value] : metadata) meta[key] = value;
  header["__metadata__"] = meta;
  uint64_t offset = 0;
  for (const auto& item : items) {
    uint64_t nbytes = static_cast<uint64_t>(item.tensor.numel()) * dtype_size(item.dtype);
    header[*item.name] = {{"dtype", std::string(dtype_name(item.dtype))},
                          {"shape", item.tensor.sizes().vec()},
                          {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // data then starts 8-byte aligned

  AtomicFile file(path);
  uint64_t length = text.size();
  unsigned char length_bytes[8];
  for (int i = 0; i < 8; ++i) length_bytes[i] = static_cast<unsigned char>(length >> (8 * i));
  file.write(length_bytes, 8);
  file.write(text);
  for (const auto& item : items) {
    auto cpu = item.tensor.detach().to(torch::kCPU).contiguous();
    file.write(cpu.data_ptr(), static_cast<std::size_t>(cpu.numel()) * dtype_size(item.dtype));
  }
  file.commit();
}

}  // namespace sdtrain::io
