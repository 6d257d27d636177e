#include "sdtrain/util/json.h"

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/text.h"

namespace sdtrain {

nlohmann::json read_json_file(const std::filesystem::path& path, ExitCode code) {
  if (!std::filesystem::exists(path)) throw Error(code, path.string() + ": file not found");
  std::string text = read_file(path, code);
  try {
    return nlohmann::json::parse(text);
  } catch (const nlohmann::json::parse_error& e) {
    throw Error(code, path.string() + ": not valid JSON at byte " + std::to_string(e.byte) + " (" +
                          printable(e.what()) + ")");
  } catch (const nlohmann::json::exception& e) {  // e.g. a number beyond double's range
    throw Error(code, path.string() + ": " + printable(e.what()));
  }
}

}  // namespace sdtrain
