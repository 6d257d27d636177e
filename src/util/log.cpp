#include "sdtrain/util/log.h"

#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "sdtrain/util/text.h"

namespace sdtrain::log {
namespace {

spdlog::logger& logger() {
  static std::shared_ptr<spdlog::logger> instance = [] {
    auto created = spdlog::stderr_color_mt("sdtrain");
    created->set_pattern("%^[%l]%$ %v");
    return created;
  }();
  return *instance;
}

}  // namespace

void set_level(Level level) {
  static constexpr spdlog::level::level_enum kLevels[] = {
      spdlog::level::debug, spdlog::level::info, spdlog::level::warn, spdlog::level::err,
      spdlog::level::off};
  logger().set_level(kLevels[static_cast<int>(level)]);
}

// Messages quote paths and file contents: printable() keeps raw bytes off the terminal.
void debug(std::string_view message) { logger().debug("{}", printable(message)); }
void info(std::string_view message) { logger().info("{}", printable(message)); }
void warn(std::string_view message) { logger().warn("{}", printable(message)); }
void error(std::string_view message) { logger().error("{}", printable(message)); }

}  // namespace sdtrain::log
