#include "sdtrain/util/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <regex>
#include <sstream>

#include "sdtrain/util/error.h"
#include "sdtrain/util/staged_folder.h"

namespace sdtrain {
namespace {

std::string errno_text() { return std::strerror(errno); }

}  // namespace

void sync_directory(const std::filesystem::path& directory) {
  int fd = ::open(directory.empty() ? "." : directory.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::filesystem::path temporary_path_for(const std::filesystem::path& target) {
  std::filesystem::path temporary = target;
  temporary += ".tmp." + std::to_string(::getpid());
  return temporary;
}

bool is_temporary_file_name(const std::string& name) {
  static const std::regex pattern(R"(.+\.tmp\.[0-9]+)");
  return std::regex_match(name, pattern);
}

AtomicFile::AtomicFile(std::filesystem::path target) : target_(std::move(target)) {
  temporary_ = temporary_path_for(target_);
  file_ = std::fopen(temporary_.c_str(), "wb");
  if (!file_) {
    throw OutputError("cannot create " + temporary_.string() + ": " + errno_text() +
                      " (check that the directory exists and is writable)");
  }
}

AtomicFile::~AtomicFile() {
  if (file_) std::fclose(file_);
  if (!committed_) {
    std::error_code ignored;
    std::filesystem::remove(temporary_, ignored);
  }
}

void AtomicFile::write(const void* data, std::size_t size) {
  if (size > 0 && std::fwrite(data, 1, size, file_) != size) {
    throw OutputError("cannot write " + target_.string() + ": " + errno_text() +
                      " (is the disk full?); the previous file, if any, is untouched");
  }
}

void AtomicFile::commit() {
  bool flushed = std::fflush(file_) == 0 && ::fsync(::fileno(file_)) == 0;
  std::string reason = errno_text();
  bool closed = std::fclose(file_) == 0;
  file_ = nullptr;
  if (!flushed || !closed) {
    throw OutputError("cannot write " + target_.string() + ": " + reason +
                      " (is the disk full?); the previous file, if any, is untouched");
  }
  if (std::rename(temporary_.c_str(), target_.c_str()) != 0) {
    throw OutputError("cannot rename " + temporary_.string() + " to " + target_.string() + ": " +
                      errno_text());
  }
  committed_ = true;
  sync_directory(target_.parent_path());
}

void write_file_atomically(const std::filesystem::path& target, std::string_view contents) {
  AtomicFile file(target);
  file.write(contents);
  file.commit();
}

std::string read_file(const std::filesystem::path& path, ExitCode code) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(code, "cannot read " + path.string() + ": " + errno_text());
  std::ostringstream contents;
  contents << in.rdbuf();
  return contents.str();
}

void copy_file_atomically(const std::filesystem::path& from, const std::filesystem::path& to,
                          ExitCode code) {
  write_file_atomically(to, read_file(from, code));
}

}  // namespace sdtrain
