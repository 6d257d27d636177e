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
    const std::string text = spec;
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
