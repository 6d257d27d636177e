#include "sdtrain/util/file_manifest.h"

#define XXH_INLINE_ALL  // header-only: nothing to link or to carry to a GPU machine
#include <xxhash.h>

#include <cstdio>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>
#include <vector>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"

namespace fs = std::filesystem;

namespace sdtrain {
namespace {

struct Entry {
  uint64_t size = 0;
  std::string xxh3_128;
};

std::map<std::string, Entry> scan(const fs::path& dir) {
  std::map<std::string, Entry> files;
  for (const auto& item : fs::recursive_directory_iterator(dir)) {
    if (!item.is_regular_file()) continue;
    const std::string relative = fs::relative(item.path(), dir).generic_string();
    if (relative == kManifestFile) continue;
    files[relative] = {static_cast<uint64_t>(item.file_size()), ""};
  }
  return files;
}

}  // namespace

std::string hash_file(const fs::path& path) {
  std::unique_ptr<std::FILE, int (*)(std::FILE*)> file(std::fopen(path.c_str(), "rb"), std::fclose);
  if (!file) throw OutputError("cannot read " + path.string() + " to hash it");
  std::unique_ptr<XXH3_state_t, XXH_errorcode (*)(XXH3_state_t*)> state(XXH3_createState(), XXH3_freeState);
  XXH3_128bits_reset(state.get());
  std::vector<char> buffer(8 << 20);
  while (const std::size_t n = std::fread(buffer.data(), 1, buffer.size(), file.get())) {
    XXH3_128bits_update(state.get(), buffer.data(), n);
  }
  if (std::ferror(file.get())) throw OutputError("cannot read " + path.string() + " to hash it");
  XXH128_canonical_t canonical;
  XXH128_canonicalFromHash(&canonical, XXH3_128bits_digest(state.get()));
  static constexpr char kHex[] = "0123456789abcdef";
  std::string hex;
  for (const unsigned char byte : canonical.digest) {
    hex += kHex[byte >> 4];
    hex += kHex[byte & 0xF];
  }
  return hex;
}

void write_manifest(const fs::path& dir) {
  nlohmann::ordered_json files = nlohmann::ordered_json::object();
  for (auto& [relative, entry] : scan(dir)) {
    files[relative] = {{"bytes", entry.size}, {"xxh3_128", hash_file(dir / relative)}};
  }
  nlohmann::ordered_json manifest;
  manifest["format"] = "sdtrain-manifest-1";
  manifest["files"] = std::move(files);
  write_file_atomically(dir / kManifestFile, manifest.dump(2) + "\n");
}

std::optional<std::string> verify_manifest(const fs::path& dir) {
  const fs::path path = dir / kManifestFile;
  if (!fs::is_regular_file(path)) return path.string() + " is missing (the folder was not finished)";
  nlohmann::json manifest;
  try {
    manifest = nlohmann::json::parse(read_file(path, ExitCode::model));
    if (!manifest.at("files").is_object()) return path.string() + " is not a manifest";
  } catch (const nlohmann::json::exception&) {
    return path.string() + " is not a valid manifest";
  }
  std::map<std::string, Entry> present = scan(dir);
  for (const auto& [relative, listed] : manifest["files"].items()) {
    const fs::path file = dir / relative;
    auto found = present.find(relative);
    if (found == present.end()) return file.string() + " is missing";
    try {
      if (found->second.size != listed.at("bytes").get<uint64_t>()) {
        return file.string() + " has " + std::to_string(found->second.size) + " bytes, the manifest says " +
               listed.at("bytes").dump();
      }
      if (hash_file(file) != listed.at("xxh3_128").get<std::string>()) {
        return file.string() + " does not match its hash in " + path.string() + " (the file was changed or damaged)";
      }
    } catch (const nlohmann::json::exception&) {
      return path.string() + " has an invalid entry for " + relative;
    }
    present.erase(found);
  }
  if (!present.empty()) return (dir / present.begin()->first).string() + " is not listed in " + path.string();
  return std::nullopt;
}

}  // namespace sdtrain
