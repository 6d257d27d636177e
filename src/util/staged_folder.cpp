#include "sdtrain/util/staged_folder.h"

#include <unistd.h>

#include <regex>
#include <system_error>

#include "sdtrain/util/error.h"

namespace fs = std::filesystem;

namespace sdtrain {

namespace {

void remove_all_or_throw(const fs::path& path) {
  std::error_code error;
  fs::remove_all(path, error);
  if (error) throw OutputError("cannot remove " + path.string() + ": " + error.message());
}

// ".NAME.partial.PID": unique to this process, so two processes never share a staging folder;
// remove_leftovers (util/output_lock.h) clears those of killed runs.
fs::path hidden_sibling(const fs::path& target, const std::string& suffix) {
  return target.parent_path() /
         ("." + target.filename().string() + suffix + "." + std::to_string(::getpid()));
}

}  // namespace

std::optional<StagedLeftover> staged_leftover(const std::string& folder_name) {
  static const std::regex pattern(R"(\.(.+)\.(partial|old)(\.[0-9]+)?)");
  std::smatch match;
  if (!std::regex_match(folder_name, match, pattern)) return std::nullopt;
  return StagedLeftover{match[2] == "partial", match[1].str()};
}

StagedFolder::StagedFolder(fs::path target)
    : target_(std::move(target)), staging_(hidden_sibling(target_, ".partial")) {
  remove_all_or_throw(staging_);
  std::error_code error;
  fs::create_directories(staging_, error);
  if (error) {
    throw OutputError("cannot create " + staging_.string() + ": " + error.message() +
                      " (check that " + target_.parent_path().string() + " is writable)");
  }
}

StagedFolder::~StagedFolder() {
  std::error_code ignored;
  if (!published_) fs::remove_all(staging_, ignored);
}

void StagedFolder::publish() {
  const fs::path previous = hidden_sibling(target_, ".old");
  remove_all_or_throw(previous);
  std::error_code error;
  if (fs::exists(target_)) fs::rename(target_, previous, error);
  if (!error) fs::rename(staging_, target_, error);
  if (error) {
    throw OutputError("cannot move " + staging_.string() + " to " + target_.string() + ": " +
                      error.message());
  }
  published_ = true;
  sync_directory(target_.parent_path());
  remove_all_or_throw(previous);
}

}  // namespace sdtrain
