#pragma once
// Outputs are never half-written: data goes to a temporary file beside the target, is
// flushed to disk (fsync), and only then renamed over the target. A crash or a full disk
// leaves the previous file (if any) intact.

#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

#include "sdtrain/util/error.h"

namespace sdtrain {

// The temporary AtomicFile writes first: TARGET.tmp.PID beside the target, unique to the
// process. is_temporary_file_name recognises one that a killed run left (remove_leftovers).
std::filesystem::path temporary_path_for(const std::filesystem::path& target);
bool is_temporary_file_name(const std::string& name);

class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path target);
  ~AtomicFile();  // removes the temporary file unless commit() succeeded
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, std::size_t size);
  void write(std::string_view text) { write(text.data(), text.size()); }
  // fsync, close, rename over the target, fsync the directory. Throws OutputError.
  void commit();

  const std::filesystem::path& target() const { return target_; }

 private:
  std::filesystem::path target_;
  std::filesystem::path temporary_;
  std::FILE* file_ = nullptr;
  bool committed_ = false;
};

void write_file_atomically(const std::filesystem::path& target, std::string_view contents);

// Copies `from` to `to` through AtomicFile (a missing source is an Error with `code`).
void copy_file_atomically(const std::filesystem::path& from, const std::filesystem::path& to,
                          ExitCode code = ExitCode::model);

// Whole file as bytes; throws an Error with `code` naming the file when it cannot be read.
std::string read_file(const std::filesystem::path& path, ExitCode code = ExitCode::input_data);

}  // namespace sdtrain
