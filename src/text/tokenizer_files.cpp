#include "tokenizer_files.h"

#include <algorithm>
#include <fstream>
#include <limits>
#include <sstream>
#include <utility>

#include "sdtrain/util/error.h"
#include "sdtrain/util/text.h"

namespace sdtrain::text::detail {

namespace fs = std::filesystem;
using json = nlohmann::json;

const std::string kRecopyFix =
    "copy the tokenizer/ folder of the base model (e.g. stabilityai/stable-diffusion-2-1-base) "
    "unchanged";

std::string read_text_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ModelError("cannot open " + path.string());
  std::ostringstream out;
  out << in.rdbuf();
  if (in.bad()) throw ModelError("cannot read " + path.string());
  return out.str();
}

json read_json_file(const fs::path& path, const std::string& fix) {
  if (!fs::is_regular_file(path)) throw ModelError(path.string() + " is missing: " + fix);
  try {
    return json::parse(read_text_file(path));
  } catch (const json::exception& e) {
    throw ModelError(path.string() + " is not valid JSON (" + printable(e.what()) + "): " + fix);
  }
}

Vocab read_vocab(const fs::path& vocab_path) {
  if (!fs::exists(vocab_path) && fs::exists(vocab_path.parent_path() / "tokenizer.json")) {
    throw ModelError(vocab_path.string() +
                     " is missing (the folder has only tokenizer.json, as transformers 5 saves "
                     "it): sdtrain reads vocab.json + merges.txt; " +
                     kRecopyFix);
  }
  const std::string fix = "vocab.json must map every token to its id; " + kRecopyFix;
  json vocab_json = read_json_file(vocab_path, fix);
  if (!vocab_json.is_object() || vocab_json.empty()) {
    throw ModelError(vocab_path.string() + " must be a non-empty JSON object; " + fix);
  }
  Vocab vocab;
  vocab.reserve(vocab_json.size());
  for (const auto& [token, id] : vocab_json.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw ModelError(vocab_path.string() + ": the id of \"" + token +
                       "\" is not a non-negative integer; " + fix);
    }
    vocab.emplace(token, id.get<int64_t>());
  }
  return vocab;
}

std::vector<std::string> tokens_by_id(const Vocab& vocab, const fs::path& vocab_path) {
  int64_t max_id = -1;
  for (const auto& [token, id] : vocab) max_id = std::max(max_id, id);
  std::vector<std::string> id_to_token(static_cast<std::size_t>(max_id + 1), std::string());
  std::vector<bool> seen(static_cast<std::size_t>(max_id + 1), false);
  for (const auto& [token, id] : vocab) {
    if (seen[id]) {
      throw ModelError(vocab_path.string() + ": id " + std::to_string(id) +
                       " is used by two tokens; " + kRecopyFix);
    }
    seen[id] = true;
    id_to_token[id] = token;
  }
  return id_to_token;
}

namespace {

// One merge line "a b": the two symbols, or a ModelError naming the line.
std::pair<std::string, std::string> split_merge_line(const std::string& line, int line_number,
                                                     const fs::path& merges_path) {
  auto space = line.find(' ');
  if (space == std::string::npos || space == 0 || space + 1 == line.size() ||
      line.find(' ', space + 1) != std::string::npos) {
    throw ModelError(merges_path.string() + " line " + std::to_string(line_number) +
                     ": expected two symbols separated by one space, found \"" + line + "\"; " +
                     kRecopyFix);
  }
  return {line.substr(0, space), line.substr(space + 1)};
}

int64_t merge_symbol_id(const Vocab& vocab, const std::string& token, int line_number,
                        const fs::path& merges_path) {
  auto it = vocab.find(token);
  if (it == vocab.end()) {
    throw ModelError(merges_path.string() + " line " + std::to_string(line_number) + ": \"" +
                     token +
                     "\" is not in vocab.json (merges.txt and vocab.json do not "
                     "belong together); " +
                     kRecopyFix);
  }
  return it->second;
}

}  // namespace

// merges.txt: an optional "#version" first line, then one merge "a b" per line, in rank
// order. Blank lines (the file's trailing newline) are skipped.
MergeTable read_merges(const fs::path& merges_path, const Vocab& vocab) {
  if (!fs::is_regular_file(merges_path)) {
    throw ModelError(merges_path.string() + " is missing: " + kRecopyFix);
  }
  std::istringstream merges_text(read_text_file(merges_path));
  MergeTable merges;
  std::string line;
  int line_number = 0;
  int32_t rank = 0;
  while (std::getline(merges_text, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_number == 1 && line.rfind("#version", 0) == 0)) continue;
    auto [a, b] = split_merge_line(line, line_number, merges_path);
    int64_t id_a = merge_symbol_id(vocab, a, line_number, merges_path);
    int64_t id_b = merge_symbol_id(vocab, b, line_number, merges_path);
    int64_t id_merged = merge_symbol_id(vocab, a + b, line_number, merges_path);
    // The first occurrence of a pair keeps its rank, as the reference's merge map does.
    merges.emplace(pair_key(id_a, id_b), Merge{rank, id_merged});
    ++rank;
  }
  return merges;
}

}  // namespace sdtrain::text::detail
