#include "sdtrain/util/kill_point.h"

#include <csignal>
#include <cstdlib>
#include <string>

namespace sdtrain {
namespace {

struct Target {
  std::string name;
  long reach = 1;  // which reach of the point kills
  long reached = 0;
};

Target& target() {
  static Target parsed = [] {
    Target t;
    const char* spec = std::getenv("SDTRAIN_KILL_AT");
    if (!spec) return t;
    std::string text = spec;
    // NAME#K@R: only the data-parallel process of RANK R (a rank dying alone).
    if (const auto at = text.find('@'); at != std::string::npos) {
      const char* rank = std::getenv("RANK");
      if (!rank || text.substr(at + 1) != rank) return t;
      text.resize(at);
    }
    const auto hash = text.find('#');
    t.name = text.substr(0, hash);
    if (hash != std::string::npos) t.reach = std::strtol(text.c_str() + hash + 1, nullptr, 10);
    return t;
  }();
  return parsed;
}

}  // namespace

bool kill_point_due(const char* name) {
  Target& t = target();
  return !t.name.empty() && t.name == name && ++t.reached == t.reach;
}

void kill_now() {
  std::raise(SIGKILL);
  std::abort();  // not reached: SIGKILL cannot be caught
}

}  // namespace sdtrain
