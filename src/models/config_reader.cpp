#include "config_reader.h"

#include "sdtrain/util/error.h"
#include "sdtrain/util/log.h"

namespace sdtrain::models::detail {

ConfigReader::ConfigReader(const nlohmann::json& json, std::string source) : json_(json), source_(std::move(source)) {
  if (!json_.is_object()) throw ModelError(source_ + ": expected a JSON object");
}

const nlohmann::json* ConfigReader::find(const std::string& key) {
  known_.insert(key);
  auto it = json_.find(key);
  return it == json_.end() ? nullptr : &*it;
}

void ConfigReader::fail(const std::string& key, const nlohmann::json& value, const std::string& why) const {
  throw ModelError(source_ + ": \"" + key + "\" = " + value.dump() + " is not supported: " + why);
}

bool ConfigReader::boolean(const std::string& key, bool fallback, bool null_is_false) {
  const nlohmann::json* v = find(key);
  if (!v) return fallback;
  if (v->is_null() && null_is_false) return false;
  if (!v->is_boolean()) fail(key, *v, "expected true or false");
  return v->get<bool>();
}

int64_t ConfigReader::integer(const std::string& key, int64_t fallback) {
  const nlohmann::json* v = find(key);
  if (!v) return fallback;
  if (!v->is_number_integer()) fail(key, *v, "expected an integer");
  return v->get<int64_t>();
}

double ConfigReader::number(const std::string& key, double fallback) {
  const nlohmann::json* v = find(key);
  if (!v) return fallback;
  if (!v->is_number()) fail(key, *v, "expected a number");
  return v->get<double>();
}

std::string ConfigReader::string(const std::string& key, const std::string& fallback) {
  const nlohmann::json* v = find(key);
  if (!v) return fallback;
  if (!v->is_string()) fail(key, *v, "expected a string");
  return v->get<std::string>();
}

std::vector<std::string> ConfigReader::string_list(const std::string& key, const std::vector<std::string>& fallback) {
  const nlohmann::json* v = find(key);
  if (!v) return fallback;
  if (!v->is_array() || v->empty()) fail(key, *v, "expected a non-empty list of strings");
  std::vector<std::string> out;
  for (const auto& item : *v) {
    if (!item.is_string()) fail(key, *v, "expected a list of strings");
    out.push_back(item.get<std::string>());
  }
  return out;
}

std::vector<int64_t> ConfigReader::int_list(const std::string& key, const std::vector<int64_t>& fallback, std::size_t count) {
  const nlohmann::json* v = find(key);
  if (!v) {
    if (fallback.size() == 1) return std::vector<int64_t>(count, fallback.front());
    return fallback;
  }
  if (v->is_number_integer()) return std::vector<int64_t>(count, v->get<int64_t>());
  if (!v->is_array()) fail(key, *v, "expected an integer or a list of integers");
  std::vector<int64_t> out;
  for (const auto& item : *v) {
    if (!item.is_number_integer()) fail(key, *v, "expected an integer or a list of integers");
    out.push_back(item.get<int64_t>());
  }
  if (count != 0 && out.size() != count) {
    fail(key, *v, "expected " + std::to_string(count) + " entries, one per block");
  }
  return out;
}

void ConfigReader::require_null(const std::string& key, const std::string& why) {
  const nlohmann::json* v = find(key);
  if (v && !v->is_null()) fail(key, *v, why);
}

void ConfigReader::require_value(const std::string& key, const nlohmann::json& expected, const std::string& why, bool null_ok) {
  const nlohmann::json* v = find(key);
  if (!v || (null_ok && v->is_null())) return;
  // Numbers compare by value (0 and 0.0 are the same setting).
  if (v->is_number() && expected.is_number()) {
    if (v->get<double>() != expected.get<double>()) fail(key, *v, why);
    return;
  }
  if (*v != expected) fail(key, *v, why);
}

void ConfigReader::ignore(const std::string& key) { known_.insert(key); }

void ConfigReader::warn_unknown_keys() const {
  for (const auto& item : json_.items()) {
    if (item.key().empty() || item.key().front() == '_' || known_.count(item.key())) continue;
    log::warn(log::str(source_, ": ignoring unknown key ", item.key(), " = ", item.value().dump()));
  }
}

}  // namespace sdtrain::models::detail
