#pragma once
// The machinery of the configuration's key table (train_config.cpp): parsing a JSON value into
// a typed member with SageMaker's string spellings accepted, range checks, and the Field that
// ties a key's name, type, help and default to where TrainConfig keeps it. Internal to
// src/train; the key table itself stays in train_config.cpp.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "sdtrain/train/train_config.h"
#include "sdtrain/util/error.h"
#include "sdtrain/util/text.h"

namespace sdtrain::train::config_fields {

using json = nlohmann::json;
namespace fs = std::filesystem;

// Where a value came from, for error messages and relative paths.
struct Origin {
  std::string source;  // "cat.json" or "--set"
  fs::path base_dir;   // relative paths are resolved against this
};

[[noreturn]] inline void fail(const Origin& origin, const std::string& key,
                              const std::string& what) {
  throw ConfigError(origin.source + ": key \"" + key + "\": " + what);
}

// SageMaker passes every hyperparameter as a string ("400", "True"), so a string that spells a
// value of the right type exactly is accepted; anything else of the wrong type is an error.
inline bool parse_bool(const json& value, const Origin& origin, const std::string& key) {
  if (value.is_boolean()) return value.get<bool>();
  if (value.is_string()) {
    const auto& s = value.get_ref<const std::string&>();
    if (s == "true" || s == "True") return true;
    if (s == "false" || s == "False") return false;
  }
  fail(origin, key, "expected true or false, got " + value.dump());
}

inline int64_t parse_integer(const json& value, const Origin& origin, const std::string& key) {
  if (value.is_number_integer()) return value.get<int64_t>();
  if (value.is_string()) {
    const auto& s = value.get_ref<const std::string&>();
    int64_t parsed = 0;
    auto [end, error] = std::from_chars(s.data(), s.data() + s.size(), parsed);
    if (error == std::errc() && end == s.data() + s.size() && !s.empty()) return parsed;
  }
  fail(origin, key, "expected an integer, got " + value.dump());
}

inline double parse_number(const json& value, const Origin& origin, const std::string& key) {
  if (value.is_number() && std::isfinite(value.get<double>())) return value.get<double>();
  if (value.is_string()) {
    const auto& s = value.get_ref<const std::string&>();
    try {
      std::size_t used = 0;
      double parsed = std::stod(s, &used);
      if (used == s.size() && std::isfinite(parsed)) return parsed;
      if (used == s.size()) fail(origin, key, "expected a finite number, got " + printable(s));
    } catch (const std::logic_error&) {  // stod: not a number, or out of double's range
    }
  }
  fail(origin, key,
       "expected a number, got " +
           printable(value.dump(-1, ' ', false, json::error_handler_t::replace)));
}

inline std::string parse_string(const json& value, const Origin& origin, const std::string& key) {
  if (value.is_string() && !is_valid_utf8(value.get_ref<const std::string&>())) {
    // Paths and prompts go into train_config.json and PNG metadata, which are UTF-8.
    fail(origin, key,
         "is not valid UTF-8: \"" + printable(value.get_ref<const std::string&>()) +
             "\" (rename the file or folder, or fix the text's encoding)");
  }
  if (value.is_string()) return value.get<std::string>();
  fail(origin, key, "expected a string, got " + value.dump());
}

template <typename T>
using Check = std::function<std::optional<std::string>(const T&)>;

template <typename T>
Check<T> at_least(T minimum) {
  return [minimum](const T& v) -> std::optional<std::string> {
    if (v >= minimum) return std::nullopt;
    return "must be at least " + json(minimum).dump() + ", got " + json(v).dump();
  };
}

// SD 1/2 train at 512 or 768. At 4096 the UNet's first self-attention already spans 262,144
// latent positions; far beyond it, allocations fail deep inside the run instead of here.
inline Check<int> in_range(int minimum, int maximum) {
  return [minimum, maximum](const int& v) -> std::optional<std::string> {
    if (v >= minimum && v <= maximum) return std::nullopt;
    return "must be between " + std::to_string(minimum) + " and " + std::to_string(maximum) +
           ", got " + std::to_string(v);
  };
}

inline Check<double> positive() {
  return [](const double& v) -> std::optional<std::string> {
    if (v > 0) return std::nullopt;
    return "must be greater than 0, got " + json(v).dump();
  };
}

inline Check<double> in_unit_interval() {  // [0, 1)
  return [](const double& v) -> std::optional<std::string> {
    if (v >= 0 && v < 1) return std::nullopt;
    return "must be in [0, 1), got " + json(v).dump();
  };
}

inline Check<std::string> one_of(std::vector<std::string> allowed) {
  return [allowed](const std::string& v) -> std::optional<std::string> {
    if (std::find(allowed.begin(), allowed.end(), v) != allowed.end()) return std::nullopt;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + ("\"" + a + "\"");
    return "must be one of " + list + ", got \"" + v + "\"";
  };
}

// A non-empty list whose items are each one of `allowed`, none twice.
inline Check<std::vector<std::string>> each_of(std::vector<std::string> allowed) {
  return [allowed](const std::vector<std::string>& items) -> std::optional<std::string> {
    if (items.empty()) return "must name at least one of them";
    for (std::size_t i = 0; i < items.size(); ++i) {
      if (auto problem = one_of(allowed)(items[i]))
        return "item " + std::to_string(i) + " " + *problem;
      for (std::size_t j = 0; j < i; ++j) {
        if (items[j] == items[i]) return "names \"" + items[i] + "\" twice";
      }
    }
    return std::nullopt;
  };
}

struct Field {
  ConfigKeyInfo info;
  bool is_path = false;
  std::function<void(TrainConfig&, const json&, const Origin&)> set;
  std::function<json(const TrainConfig&)> get;
};

template <typename T>
T parse_as(const json& value, const Origin& origin, const std::string& key) {
  if constexpr (std::is_same_v<T, bool>) {
    return parse_bool(value, origin, key);
  } else if constexpr (std::is_integral_v<T>) {
    int64_t v = parse_integer(value, origin, key);
    if (v < std::numeric_limits<T>::min() || v > std::numeric_limits<T>::max())
      fail(origin, key, "value out of range");
    return static_cast<T>(v);
  } else if constexpr (std::is_same_v<T, double>) {
    return parse_number(value, origin, key);
  } else if constexpr (std::is_same_v<T, std::string>) {
    return parse_string(value, origin, key);
  } else if constexpr (std::is_same_v<T, std::vector<std::string>>) {
    if (value.is_string()) return {value.get<std::string>()};
    if (!value.is_array()) fail(origin, key, "expected a list of strings, got " + value.dump());
    std::vector<std::string> items;
    for (const auto& item : value) items.push_back(parse_string(item, origin, key));
    return items;
  }
}

template <typename T>
std::string type_name(bool is_path) {
  if constexpr (std::is_same_v<T, bool>)
    return "bool";
  else if constexpr (std::is_integral_v<T>)
    return "integer";
  else if constexpr (std::is_same_v<T, double>)
    return "number";
  else if constexpr (std::is_same_v<T, std::string>)
    return is_path ? "path" : "string";
  else
    return "list of strings";
}

// Where a key's value lives in TrainConfig: a top-level member or a member of a group.
template <typename T>
using Access = std::function<T&(TrainConfig&)>;

template <typename T>
Access<T> member_of(T TrainConfig::*member) {
  return [member](TrainConfig& config) -> T& { return config.*member; };
}

template <typename G, typename T>
Access<T> member_of(G TrainConfig::*group, T G::*member) {
  return [group, member](TrainConfig& config) -> T& { return (config.*group).*member; };
}

// Reads only: the accessor hands out a reference, never written through here.
template <typename T>
const T& read(const Access<T>& access, const TrainConfig& config) {
  return access(const_cast<TrainConfig&>(config));
}

template <typename T>
Field make_field(std::string name, Access<T> access, std::string help, Check<T> check,
                 std::vector<std::string> aliases, bool is_path) {
  Field f;
  f.info = {name, aliases, type_name<T>(is_path), "", std::move(help)};
  f.is_path = is_path;
  f.set = [name, access, check, is_path](TrainConfig& config, const json& value,
                                         const Origin& origin) {
    T parsed = parse_as<T>(value, origin, name);
    if constexpr (std::is_same_v<T, std::string>) {
      if (is_path && !parsed.empty() && fs::path(parsed).is_relative()) {
        parsed = (origin.base_dir / parsed).lexically_normal().string();
      }
    }
    if (check) {
      if (auto problem = check(parsed)) fail(origin, name, *problem);
    }
    access(config) = std::move(parsed);
  };
  f.get = [access](const TrainConfig& config) { return json(read(access, config)); };
  return f;
}

template <typename T>
Field field(std::string name, T TrainConfig::*member, std::string help, Check<T> check = {},
            std::vector<std::string> aliases = {}, bool is_path = false) {
  return make_field<T>(std::move(name), member_of(member), std::move(help), std::move(check),
                       std::move(aliases), is_path);
}

template <typename G, typename T>
Field field(std::string name, G TrainConfig::*group, T G::*member, std::string help,
            Check<T> check = {}, std::vector<std::string> aliases = {}, bool is_path = false) {
  return make_field<T>(std::move(name), member_of(group, member), std::move(help), std::move(check),
                       std::move(aliases), is_path);
}

template <typename G, typename T>
Field optional_field(std::string name, G TrainConfig::*group, std::optional<T> G::*member,
                     std::string help, Check<T> check, std::vector<std::string> aliases = {}) {
  const Access<std::optional<T>> access = member_of(group, member);
  Field f;
  f.info = {name, aliases, type_name<T>(false) + " or null", "", std::move(help)};
  f.set = [name, access, check](TrainConfig& config, const json& value, const Origin& origin) {
    if (value.is_null() || (value.is_string() && (value == "None" || value == "null"))) {
      access(config) = std::nullopt;
      return;
    }
    T parsed = parse_as<T>(value, origin, name);
    if (auto problem = check(parsed)) fail(origin, name, *problem);
    access(config) = parsed;
  };
  f.get = [access](const TrainConfig& config) {
    const std::optional<T>& value = read(access, config);
    return value ? json(*value) : json(nullptr);
  };
  return f;
}

// A key whose string values name an enum: parsed here, once; everything after uses the enum.
template <typename G, typename E>
Field enum_field(std::string name, G TrainConfig::*group, E G::*member, std::string help,
                 std::vector<std::pair<std::string, E>> names) {
  const Access<E> access = member_of(group, member);
  std::vector<std::string> spelled;
  for (const auto& entry : names) spelled.push_back(entry.first);
  Field f;
  f.info = {name, {}, "string", "", std::move(help)};
  f.set = [name, access, names, spelled](TrainConfig& config, const json& value,
                                         const Origin& origin) {
    const std::string parsed = parse_string(value, origin, name);
    if (auto problem = one_of(spelled)(parsed)) fail(origin, name, *problem);
    for (const auto& [text, e] : names) {
      if (text == parsed) access(config) = e;
    }
  };
  f.get = [access, names](const TrainConfig& config) {
    for (const auto& [text, e] : names) {
      if (e == read(access, config)) return json(text);
    }
    return json(nullptr);
  };
  return f;
}

// A key that is "auto" or a bool (true/false, or SageMaker's "True"/"False").
template <typename G>
Field auto_switch_field(std::string name, G TrainConfig::*group, AutoSwitch G::*member,
                        std::string help) {
  const Access<AutoSwitch> access = member_of(group, member);
  Field f;
  f.info = {name, {}, "\"auto\" or bool", "", std::move(help)};
  f.set = [name, access](TrainConfig& config, const json& value, const Origin& origin) {
    if (value.is_string() && value.get_ref<const std::string&>() == "auto") {
      access(config) = AutoSwitch::automatic;
      return;
    }
    static const std::vector<std::string> spellings = {"true", "True", "false", "False"};
    const bool spelled = value.is_string() && std::find(spellings.begin(), spellings.end(),
                                                        value.get<std::string>()) != spellings.end();
    if (!value.is_boolean() && !spelled)
      fail(origin, name, "expected \"auto\", true or false, got " + value.dump());
    access(config) = parse_bool(value, origin, name) ? AutoSwitch::on : AutoSwitch::off;
  };
  f.get = [access](const TrainConfig& config) {
    switch (read(access, config)) {
      case AutoSwitch::on:
        return json(true);
      case AutoSwitch::off:
        return json(false);
      default:
        return json("auto");
    }
  };
  return f;
}

// memory_budget: null, "auto" or a positive number of GiB.
template <typename G>
Field memory_budget_field(std::string name, G TrainConfig::*group, MemoryBudget G::*member,
                          std::string help) {
  const Access<MemoryBudget> access = member_of(group, member);
  Field f;
  f.info = {name, {}, "null, \"auto\" or number", "", std::move(help)};
  f.set = [name, access](TrainConfig& config, const json& value, const Origin& origin) {
    MemoryBudget budget;
    if (value.is_null() || value == "None" || value == "null") {
      budget.kind = MemoryBudget::Kind::none;
    } else if (value == "auto") {
      budget.kind = MemoryBudget::Kind::automatic;
    } else {
      budget.kind = MemoryBudget::Kind::gib;
      budget.gib = parse_number(value, origin, name);
      if (!(budget.gib > 0)) fail(origin, name, "must be null, \"auto\" or a number of GiB > 0");
    }
    access(config) = budget;
  };
  f.get = [access](const TrainConfig& config) {
    const MemoryBudget& budget = read(access, config);
    if (budget.kind == MemoryBudget::Kind::automatic) return json("auto");
    if (budget.kind == MemoryBudget::Kind::gib) return json(budget.gib);
    return json(nullptr);
  };
  return f;
}

}  // namespace sdtrain::train::config_fields
