#pragma once
// Folders are never half-written either: a StagedFolder is filled under a hidden temporary
// name beside its target (".NAME.partial.PID") and renamed into place by publish(). A crash or a
// full disk before publish() leaves the previous folder, if any, intact; staging folders of a
// killed run are cleared by the next run into the folder (remove_leftovers, util/output_lock.h).

#include <filesystem>
#include <optional>
#include <string>

namespace sdtrain {

// What a killed StagedFolder leaves beside its target, recognised by name: its staging folder
// (".NAME.partial.PID", never a finished result) or the previous folder it moved aside while
// publishing (".NAME.old.PID"). target_name is NAME. (Names without ".PID" come from sdtrain
// 0.1.) std::nullopt for any other name.
struct StagedLeftover {
  bool staging = false;  // true: ".partial", false: ".old"
  std::string target_name;
};
std::optional<StagedLeftover> staged_leftover(const std::string& folder_name);

class StagedFolder {
 public:
  explicit StagedFolder(std::filesystem::path target);
  ~StagedFolder();  // removes the staging folder unless publish() succeeded
  StagedFolder(const StagedFolder&) = delete;
  StagedFolder& operator=(const StagedFolder&) = delete;

  // Where to write the contents.
  const std::filesystem::path& path() const { return staging_; }
  // Moves the previous target aside, renames the staging folder to the target, then removes
  // the previous one. Throws OutputError.
  void publish();

 private:
  std::filesystem::path target_;
  std::filesystem::path staging_;
  bool published_ = false;
};

// fsyncs a directory so that renames inside it survive a power loss.
void sync_directory(const std::filesystem::path& dir);

}  // namespace sdtrain
