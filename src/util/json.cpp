#include "sdtrain/util/json.h"

#include "sdtrain/util/atomic_file.h"

namespace sdtrain {

nlohmann::json read_json_file(const std::filesystem::path& path, ExitCode code) {
  if (!std::filesystem::exists(path)) throw Error(code, path.string() + ": file not found");
  std::string text = read_file(path, code);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(code, path.string() + ": not valid JSON at byte " + std::to_string(e.byte) + " (" +
                          e.what() + ")");
  }
}

}  // namespace sdtrain
