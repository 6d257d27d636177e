#pragma once
// Human-readable log lines on stderr. spdlog does the work, behind this small interface:
// LibTorch bundles its own (newer) fmt headers, which Debian's spdlog cannot compile
// against, so spdlog is confined to one translation unit that never sees a torch header.

#include <sstream>
#include <string>
#include <string_view>

namespace sdtrain::log {

enum class Level { debug, info, warn, error, off };

void set_level(Level level);
void debug(std::string_view message);
void info(std::string_view message);
void warn(std::string_view message);
void error(std::string_view message);

// Concatenates anything that streams: log::info(log::str("step ", step, " loss ", loss)).
template <typename... Parts>
std::string str(const Parts&... parts) {
  std::ostringstream out;
  (out << ... << parts);
  return out.str();
}

}  // namespace sdtrain::log
