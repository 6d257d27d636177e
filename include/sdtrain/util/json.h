#pragma once

#include <filesystem>
#include <nlohmann/json.hpp>

#include "sdtrain/util/error.h"

namespace sdtrain {

// Parses a JSON file; an unreadable or malformed file is an Error with `code` that names the
// file and, for a syntax error, the byte position.
nlohmann::json read_json_file(const std::filesystem::path& path, ExitCode code);

}  // namespace sdtrain
