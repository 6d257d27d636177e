#pragma once
// Reading a diffusers component config.json into a config struct: typed getters with the
// diffusers default for absent keys, ModelErrors that name the file, key and value, and a
// record of the keys read so that unknown ones can be reported. Private to src/models.

#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

namespace sdtrain::models::detail {

class ConfigReader {
 public:
  ConfigReader(const nlohmann::json& json, std::string source);

  // The value of `key`, or nullptr when absent. Marks the key as known.
  const nlohmann::json* find(const std::string& key);
  [[noreturn]] void fail(const std::string& key, const nlohmann::json& value, const std::string& why) const;

  bool boolean(const std::string& key, bool fallback, bool null_is_false = false);
  int64_t integer(const std::string& key, int64_t fallback);
  double number(const std::string& key, double fallback);
  std::string string(const std::string& key, const std::string& fallback);
  std::vector<std::string> string_list(const std::string& key, const std::vector<std::string>& fallback);
  // A list of integers, or one integer repeated `count` times (diffusers' per-block arguments).
  std::vector<int64_t> int_list(const std::string& key, const std::vector<int64_t>& fallback, std::size_t count);

  // The key must be absent or null (a feature this implementation does not have).
  void require_null(const std::string& key, const std::string& why);
  // The key must be absent, or equal `expected` (or null when null_ok).
  void require_value(const std::string& key, const nlohmann::json& expected, const std::string& why, bool null_ok = false);
  // A known key whose value does not affect this implementation.
  void ignore(const std::string& key);

  // Logs the keys that were never looked at (those starting with "_" are metadata).
  void warn_unknown_keys() const;

 private:
  const nlohmann::json& json_;
  std::string source_;
  std::set<std::string> known_;
};

}  // namespace sdtrain::models::detail
