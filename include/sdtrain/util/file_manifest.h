#pragma once
// A folder that proves it is whole: manifest.json, written last, lists every other file in
// the folder (recursively) with its size and its XXH3-128 hash (xxHash, Debian's
// libxxhash-dev). verify_manifest() re-reads every file and compares, so a truncated file, a
// flipped byte, a missing or an added file, or a hand-edited trainer_state.json is caught
// before anything in the folder is trusted. XXH3 hashes at several GB/s, so checking a
// full-size SD checkpoint (about 5 GB) costs about a second more than reading it.

#include <filesystem>
#include <optional>
#include <string>

namespace sdtrain {

inline constexpr const char* kManifestFile = "manifest.json";

// Hex XXH3-128 of a file's bytes. Throws Error(code) naming the file when it cannot be read.
std::string hash_file(const std::filesystem::path& path);

// Writes dir/manifest.json (atomically) for every regular file under `dir` but itself.
void write_manifest(const std::filesystem::path& dir);

// nullopt when dir/manifest.json exists and every file matches it, with no file missing or
// added; otherwise what is wrong, naming the file.
std::optional<std::string> verify_manifest(const std::filesystem::path& dir);

}  // namespace sdtrain
