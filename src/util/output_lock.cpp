#include "sdtrain/util/output_lock.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <cstring>
#include <ctime>
#include <system_error>
#include <vector>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/staged_folder.h"

namespace fs = std::filesystem;

namespace sdtrain {
namespace {

std::string host_name() {
  char name[256] = {};
  if (::gethostname(name, sizeof name - 1) != 0) return "unknown host";
  return name;
}

std::string holder_text() {
  const std::time_t now = std::time(nullptr);
  char when[32] = {};
  std::strftime(when, sizeof when, "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return "pid " + std::to_string(::getpid()) + " on " + host_name() + ", started " + when;
}

std::string read_holder(int fd) {
  char text[512] = {};
  const ssize_t n = ::pread(fd, text, sizeof text - 1, 0);
  std::string holder = n > 0 ? std::string(text, static_cast<std::size_t>(n)) : "";
  while (!holder.empty() && (holder.back() == '\n' || holder.back() == '\0')) holder.pop_back();
  return holder.empty() ? "a process that has not written its name yet" : holder;
}

}  // namespace

OutputLock::OutputLock(const fs::path& dir) {
  std::error_code error;
  fs::create_directories(dir, error);
  const fs::path path = dir / kFileName;
  if (!error) fd_ = ::open(path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (error || fd_ < 0) {
    const std::string reason = error ? error.message() : std::strerror(errno);
    throw OutputError("cannot create " + path.string() + ": " + reason +
                      " (choose a writable output_dir)");
  }
  if (::flock(fd_, LOCK_EX | LOCK_NB) != 0) {
    const int lock_errno = errno;
    const std::string holder = read_holder(fd_);
    ::close(fd_);
    fd_ = -1;
    if (lock_errno != EWOULDBLOCK) {
      throw OutputError("cannot lock " + path.string() + ": " + std::strerror(lock_errno) +
                        " (the file system of output_dir must support flock)");
    }
    throw ConfigError("output_dir " + dir.string() + " is in use by another sdtrain run (" +
                      holder + "); wait for it to finish, stop it, or choose another output_dir");
  }
  const std::string text = holder_text() + "\n";
  if (::ftruncate(fd_, 0) != 0 || ::pwrite(fd_, text.data(), text.size(), 0) < 0) {
    // The lock itself is held; the text is only a courtesy for the message above.
  }
}

OutputLock::~OutputLock() {
  if (fd_ >= 0) ::close(fd_);  // closing the descriptor releases the lock
}

std::vector<fs::path> remove_leftovers(const fs::path& dir) {
  std::vector<fs::path> removed, staged;
  std::vector<std::pair<fs::path, fs::path>> replaced;  // (moved-aside folder, its original)
  std::error_code error;
  for (auto it = fs::recursive_directory_iterator(
           dir, fs::directory_options::skip_permission_denied, error);
       !error && it != fs::recursive_directory_iterator(); it.increment(error)) {
    const std::string name = it->path().filename().string();
    const bool is_folder = it->is_directory(error) && !it->is_symlink(error);
    const std::optional<StagedLeftover> leftover = is_folder ? staged_leftover(name) : std::nullopt;
    if (leftover && leftover->staging) {
      staged.push_back(it->path());
      it.disable_recursion_pending();
    } else if (leftover) {
      replaced.emplace_back(it->path(), it->path().parent_path() / leftover->target_name);
      it.disable_recursion_pending();
    } else if (!is_folder && is_temporary_file_name(name)) {
      removed.push_back(it->path());
    }
  }
  error.clear();
  for (const auto& file : removed) fs::remove(file, error);
  // A staging folder never holds a finished result (publishing renames it away), so it goes;
  // a folder moved aside comes back when nothing took its place (killed between the renames).
  for (const auto& folder : staged) {
    fs::remove_all(folder, error);
    removed.push_back(folder);
  }
  for (const auto& [folder, original] : replaced) {
    if (!fs::exists(original, error)) {
      fs::rename(folder, original, error);
      if (!error) continue;
    }
    fs::remove_all(folder, error);
    removed.push_back(folder);
  }
  return removed;
}

}  // namespace sdtrain
