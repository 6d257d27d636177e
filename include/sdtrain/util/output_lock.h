#pragma once
// One run per output folder. A run holds an exclusive advisory lock (flock) on
// OUTPUT_DIR/.sdtrain.lock from before its first write to its exit. The kernel drops the lock
// when the process ends, however it ends (SIGKILL, OOM killer, power loss), so a killed run
// never blocks the next one; a second live run into the same folder is refused at once,
// naming the holder. The file's text (PID, host, start time) is only for that message.

#include <filesystem>
#include <string>

namespace sdtrain {

class OutputLock {
 public:
  // Creates `dir` when missing and takes the lock. Throws ConfigError (exit 1) naming the PID
  // and host of the run holding it, or OutputError (exit 5) when the lock file cannot be made.
  explicit OutputLock(const std::filesystem::path& dir);
  ~OutputLock();
  OutputLock(const OutputLock&) = delete;
  OutputLock& operator=(const OutputLock&) = delete;

  static constexpr const char* kFileName = ".sdtrain.lock";

 private:
  int fd_ = -1;
};

// Removes what a killed run can leave behind in `dir` (recursively): temporary files
// (NAME.tmp.PID) and staging folders (.NAME.partial.PID). A folder moved aside while being
// replaced (.NAME.old.PID) is put back when its replacement never arrived, and removed
// otherwise. Call only while holding the folder's OutputLock. Returns what was removed.
std::vector<std::filesystem::path> remove_leftovers(const std::filesystem::path& dir);

}  // namespace sdtrain
