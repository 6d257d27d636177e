#include "sdtrain/text/clip_tokenizer.h"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/ustring.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <array>
#include <fstream>
#include <limits>
#include <map>
#include <mutex>
#include <nlohmann/json.hpp>
#include <queue>
#include <sstream>
#include <unordered_map>
#include <utility>

#include "sdtrain/util/error.h"
#include "sdtrain/util/text.h"

namespace sdtrain::text {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

// ---------------------------------------------------------------------------------------------
// Reading the folder

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

const std::string kRecopyFix =
    "copy the tokenizer/ folder of the base model (e.g. stabilityai/stable-diffusion-2-1-base) "
    "unchanged";

// A special-token value: a plain string, or an AddedToken object {"content": ..., flags}.
// transformers builds AddedToken(**value) for objects, whose `normalized` defaults to
// `not special`; plain strings become AddedToken(value, special=True, normalized=False).
AddedToken parse_token_value(const json& value, bool special_by_default, const fs::path& file,
                             const std::string& key) {
  AddedToken token;
  if (value.is_string()) {
    token.content = value.get<std::string>();
    token.special = true;
    token.normalized = false;
    return token;
  }
  auto bad = [&](const std::string& why) {
    return ModelError(file.string() + ": \"" + key + "\" " + why + "; " + kRecopyFix);
  };
  if (!value.is_object()) throw bad("must be a string or an object with \"content\"");
  auto content = value.find("content");
  if (content == value.end() || !content->is_string()) throw bad("has no string \"content\"");
  token.content = content->get<std::string>();
  auto flag = [&](const char* name, bool fallback) {
    auto it = value.find(name);
    if (it == value.end()) return fallback;
    if (!it->is_boolean()) throw bad(std::string("has a non-boolean \"") + name + "\"");
    return it->get<bool>();
  };
  token.special = flag("special", special_by_default);
  token.normalized = flag("normalized", !token.special);
  token.lstrip = flag("lstrip", false);
  token.rstrip = flag("rstrip", false);
  if (flag("single_word", false)) {
    throw bad(
        "sets single_word=true, which sdtrain does not implement (no Stable Diffusion "
        "tokenizer uses it)");
  }
  if (token.content.empty()) throw bad("has an empty \"content\"");
  return token;
}

const std::array<const char*, 7> kSpecialTokenKeys = {
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"};

// ---------------------------------------------------------------------------------------------
// Unicode: ICU supplies the categories, NFC and case mapping.

bool is_letter(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_L_MASK) != 0; }
bool is_number(UChar32 c) { return (U_GET_GC_MASK(c) & U_GC_N_MASK) != 0; }
// The Rust regex engine's \s and Rust's char::is_whitespace are both the Unicode White_Space
// property (so U+0085 and U+3000 are whitespace, U+200B and U+001C are not).
bool is_space(UChar32 c) { return u_isUWhiteSpace(c) != 0; }

// Invalid UTF-8 becomes U+FFFD, as Python's bytes.decode(errors="replace") would make it.
std::u32string utf8_to_utf32(std::string_view text) {
  std::u32string out;
  out.reserve(text.size());
  const auto* s = reinterpret_cast<const uint8_t*>(text.data());
  int32_t length = static_cast<int32_t>(text.size()), i = 0;
  while (i < length) {
    UChar32 c;
    U8_NEXT(s, i, length, c);
    out.push_back(c < 0 ? 0xFFFD : static_cast<char32_t>(c));
  }
  return out;
}

void append_utf8(std::string& out, char32_t c) {
  uint8_t buffer[4];
  int32_t n = 0;
  UBool error = false;
  U8_APPEND(buffer, n, 4, static_cast<UChar32>(c), error);
  if (error) {
    out += "\xEF\xBF\xBD";
  } else {
    out.append(reinterpret_cast<const char*>(buffer), n);
  }
}

std::string utf32_to_utf8(std::u32string_view text) {
  std::string out;
  out.reserve(text.size());
  for (char32_t c : text) append_utf8(out, c);
  return out;
}

std::string lossy_utf8(std::string_view bytes) { return utf32_to_utf8(utf8_to_utf32(bytes)); }

// The normalizer of transformers 5's CLIPTokenizer: NFC, every \s+ run -> " ", lowercase.
// Lowercasing is per code point with the full (not the simple) mapping and no context, as
// Rust's char::to_lowercase does: "İ" -> "i̇", and a final "Σ" -> "σ" (not "ς").
std::u32string normalize(std::u32string_view text) {
  // ASCII text is already in NFC.
  bool ascii = std::all_of(text.begin(), text.end(), [](char32_t c) { return c < 0x80; });
  std::u32string nfc_storage;
  if (!ascii) {
    UErrorCode status = U_ZERO_ERROR;
    const icu::Normalizer2* normalizer = icu::Normalizer2::getNFCInstance(status);
    if (U_FAILURE(status)) throw std::runtime_error("ICU's NFC normalizer is unavailable");
    icu::UnicodeString source = icu::UnicodeString::fromUTF32(
        reinterpret_cast<const UChar32*>(text.data()), static_cast<int32_t>(text.size()));
    icu::UnicodeString result = normalizer->normalize(source, status);
    if (U_FAILURE(status)) throw std::runtime_error("ICU NFC normalization failed");
    nfc_storage.resize(result.countChar32());
    UErrorCode convert_status = U_ZERO_ERROR;
    result.toUTF32(reinterpret_cast<UChar32*>(nfc_storage.data()),
                   static_cast<int32_t>(nfc_storage.size()), convert_status);
  }
  std::u32string_view nfc = ascii ? text : std::u32string_view(nfc_storage);
  std::u32string out;
  out.reserve(nfc.size());
  for (std::size_t i = 0; i < nfc.size(); ++i) {
    char32_t c = nfc[i];
    if (is_space(c)) {
      while (i + 1 < nfc.size() && is_space(nfc[i + 1])) ++i;
      out.push_back(U' ');
    } else if (c < 0x80) {
      out.push_back(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    } else {
      UChar source[2];
      int32_t source_length = 0;
      U16_APPEND_UNSAFE(source, source_length, static_cast<UChar32>(c));
      UChar lower[8];
      UErrorCode status = U_ZERO_ERROR;
      int32_t n = u_strToLower(lower, 8, source, source_length, "", &status);
      if (U_FAILURE(status)) {
        out.push_back(c);
        continue;
      }
      for (int32_t j = 0; j < n;) {
        UChar32 lc;
        U16_NEXT(lower, j, n, lc);
        out.push_back(static_cast<char32_t>(lc));
      }
    }
  }
  return out;
}

bool starts_with_at(std::u32string_view text, std::size_t at, std::u32string_view prefix) {
  return text.size() - at >= prefix.size() && text.compare(at, prefix.size(), prefix) == 0;
}

// The contractions of both patterns, in the patterns' order: 's 't 're 've 'm 'll 'd.
std::size_t contraction_length(std::u32string_view text, std::size_t at) {
  static const std::array<std::u32string_view, 7> kContractions = {U"'s", U"'t",  U"'re", U"'ve",
                                                                   U"'m", U"'ll", U"'d"};
  for (auto c : kContractions) {
    if (starts_with_at(text, at, c)) return c.size();
  }
  return 0;
}

template <typename Predicate>
std::size_t run_length(std::u32string_view text, std::size_t at, Predicate predicate) {
  std::size_t end = at;
  while (end < text.size() && predicate(text[end])) ++end;
  return end - at;
}

bool is_other(char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

// GPT-2's byte-level pattern as the ByteLevel pre-tokenizer applies it to one piece of CLIP's
// split (which holds no whitespace, so only these alternatives can match):
//   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+
// It changes CLIP's pieces only where CLIP's pattern kept "<|startoftext|>" or
// "<|endoftext|>" whole: those become "<|", the word, "|>".
void split_byte_level(std::u32string_view piece, std::vector<std::u32string>& out) {
  std::size_t i = 0;
  while (i < piece.size()) {
    std::size_t n = contraction_length(piece, i);
    if (n == 0) {
      char32_t c = piece[i];
      if (is_letter(c)) {
        n = run_length(piece, i, is_letter);
      } else if (is_number(c)) {
        n = run_length(piece, i, is_number);
      } else if (is_other(c)) {
        n = run_length(piece, i, is_other);
      } else {
        n = run_length(piece, i, is_space);
      }
    }
    out.emplace_back(piece.substr(i, n));
    i += n;
  }
}

// CLIP's pattern, kept matches only (whitespace between them is dropped):
//   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// Digits are split one at a time. Each alternative is a literal or one greedy class run, so
// trying them in order at each position is exactly the regex's leftmost-first match.
std::vector<std::u32string> pre_tokenize(std::u32string_view text) {
  std::vector<std::u32string> pieces;
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t n = 0;
    if (starts_with_at(text, i, U"<|startoftext|>")) {
      n = 15;
    } else if (starts_with_at(text, i, U"<|endoftext|>")) {
      n = 13;
    } else if ((n = contraction_length(text, i)) != 0) {
    } else if (is_letter(text[i])) {
      n = run_length(text, i, is_letter);
    } else if (is_number(text[i])) {
      n = 1;
    } else if (is_other(text[i])) {
      n = run_length(text, i, is_other);
    } else {
      ++i;  // whitespace
      continue;
    }
    split_byte_level(text.substr(i, n), pieces);
    i += n;
  }
  return pieces;
}

// CLIP's byte alphabet: the 188 printable bytes map to themselves, the other 68 to U+0100 +
// n in increasing byte order (shared reference sd-models.md §5). Entries are UTF-8.
std::array<std::string, 256> make_byte_symbols() {
  std::array<std::string, 256> symbols;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    std::string s;
    append_utf8(s, printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++));
    symbols[b] = s;
  }
  return symbols;
}

const std::array<std::string, 256>& byte_symbols() {
  static const auto symbols = make_byte_symbols();
  return symbols;
}

const std::unordered_map<char32_t, uint8_t>& symbol_bytes() {
  static const auto table = [] {
    std::unordered_map<char32_t, uint8_t> t;
    for (int b = 0; b < 256; ++b) t[utf8_to_utf32(byte_symbols()[b])[0]] = static_cast<uint8_t>(b);
    return t;
  }();
  return table;
}

constexpr std::string_view kEndOfWord = "</w>";

uint64_t pair_key(int64_t a, int64_t b) {
  return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(static_cast<uint32_t>(b));
}

struct Merge {
  int32_t rank;
  int64_t id;  // id of the merged symbol
};

// One piece of text after the added-token split: either an added token's id, or text that
// still has to be (normalized,) pre-tokenized and merged.
struct Segment {
  int64_t token_id = -1;
  std::u32string text;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Config

CLIPTokenizerConfig CLIPTokenizerConfig::from_folder(const fs::path& tokenizer_dir) {
  CLIPTokenizerConfig config;
  const fs::path config_path = tokenizer_dir / "tokenizer_config.json";
  const fs::path map_path = tokenizer_dir / "special_tokens_map.json";
  json tokenizer_config = read_json_file(config_path, kRecopyFix);
  if (!tokenizer_config.is_object()) {
    throw ModelError(config_path.string() + " must hold a JSON object; " + kRecopyFix);
  }

  if (auto it = tokenizer_config.find("tokenizer_class"); it != tokenizer_config.end()) {
    std::string name = it->is_string() ? it->get<std::string>() : it->dump();
    if (name != "CLIPTokenizer" && name != "CLIPTokenizerFast") {
      throw ModelError(config_path.string() + ": tokenizer_class is " + name +
                       ", but Stable Diffusion 1.x/2.x models use CLIPTokenizer; check that "
                       "this is the model folder's tokenizer/ directory");
    }
  }
  auto max_length = tokenizer_config.find("model_max_length");
  if (max_length == tokenizer_config.end() || !max_length->is_number_integer() ||
      max_length->get<int64_t>() < 2 || max_length->get<int64_t>() > 1000000) {
    throw ModelError(config_path.string() +
                     ": needs an integer \"model_max_length\" (77 for Stable Diffusion); add "
                     "\"model_max_length\": 77 or " +
                     kRecopyFix);
  }
  config.model_max_length = max_length->get<int64_t>();

  // Named special tokens: tokenizer_config.json, overridden by special_tokens_map.json unless
  // the config carries added_tokens_decoder (then transformers never opens the map file).
  std::map<std::string, AddedToken> named;
  for (const char* key : kSpecialTokenKeys) {
    if (auto it = tokenizer_config.find(key); it != tokenizer_config.end() && !it->is_null()) {
      named[key] = parse_token_value(*it, false, config_path, key);
    }
  }
  std::vector<AddedToken> decoder_tokens;
  auto decoder = tokenizer_config.find("added_tokens_decoder");
  std::vector<AddedToken> extra;
  auto read_extra = [&](const json& file_json, const fs::path& file, bool special_default) {
    for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
      auto it = file_json.find(key);
      if (it == file_json.end() || it->is_null()) continue;
      if (!it->is_array()) {
        throw ModelError(file.string() + ": \"" + key + "\" must be a list; " + kRecopyFix);
      }
      // Lists from both files are merged, keeping the first of each content.
      for (const auto& value : *it) {
        AddedToken token = parse_token_value(value, special_default, file, key);
        bool known = std::any_of(extra.begin(), extra.end(),
                                 [&](const AddedToken& t) { return t.content == token.content; });
        if (!known) extra.push_back(token);
      }
    }
  };
  read_extra(tokenizer_config, config_path, false);

  if (decoder != tokenizer_config.end()) {
    if (!decoder->is_object()) {
      throw ModelError(config_path.string() + ": \"added_tokens_decoder\" must be an object; " +
                       kRecopyFix);
    }
    std::vector<std::pair<int64_t, AddedToken>> by_id;
    for (const auto& [index, value] : decoder->items()) {
      int64_t id = -1;
      try {
        std::size_t used = 0;
        id = std::stoll(index, &used);
        if (used != index.size() || id < 0) id = -1;
      } catch (const std::exception&) {
        id = -1;
      }
      if (id < 0) {
        throw ModelError(config_path.string() + ": added_tokens_decoder key \"" + index +
                         "\" is not a token id; " + kRecopyFix);
      }
      AddedToken token =
          parse_token_value(value, false, config_path, "added_tokens_decoder." + index);
      token.id = id;
      by_id.emplace_back(id, token);
    }
    std::sort(by_id.begin(), by_id.end(),
              [](const auto& a, const auto& b) { return a.first < b.first; });
    for (auto& [id, token] : by_id) decoder_tokens.push_back(token);
    // A named token given as a string takes the flags of its added_tokens_decoder entry.
    for (auto& [key, token] : named) {
      for (const auto& d : decoder_tokens) {
        if (d.content == token.content) token = d;
      }
    }
  } else if (fs::exists(map_path)) {
    json map = read_json_file(map_path, kRecopyFix);
    if (!map.is_object())
      throw ModelError(map_path.string() + " must hold a JSON object; " + kRecopyFix);
    for (const char* key : kSpecialTokenKeys) {
      if (auto it = map.find(key); it != map.end() && !it->is_null()) {
        named[key] = parse_token_value(*it, true, map_path, key);
      }
    }
    read_extra(map, map_path, true);
  }

  // CLIPTokenizer's own defaults for whatever neither file names.
  auto content_or = [&](const char* key, const std::string& fallback) {
    auto it = named.find(key);
    if (it != named.end()) return it->second.content;
    AddedToken token;
    token.content = fallback;
    named[key] = token;
    return fallback;
  };
  config.bos_token = content_or("bos_token", "<|startoftext|>");
  config.eos_token = content_or("eos_token", "<|endoftext|>");
  config.unk_token = content_or("unk_token", "<|endoftext|>");
  config.pad_token = content_or("pad_token", "<|endoftext|>");

  config.added_tokens = decoder_tokens;
  for (const char* key : kSpecialTokenKeys) {
    if (auto it = named.find(key); it != named.end()) {
      AddedToken token = it->second;
      token.special = true;
      config.added_tokens.push_back(token);
    }
  }
  for (auto& token : extra) {
    token.special = true;
    config.added_tokens.push_back(token);
  }
  return config;
}

// ---------------------------------------------------------------------------------------------
// Tokenizer state

struct CLIPTokenizer::State {
  CLIPTokenizerConfig config;
  std::unordered_map<std::string, int64_t> vocab;
  std::vector<std::string> id_to_token;  // model vocabulary and added tokens
  std::unordered_map<uint64_t, Merge> merges;
  int64_t model_vocab_size = 0;

  // Added tokens after de-duplication (later registrations' flags win), with their ids.
  struct Added {
    std::u32string pattern;  // what is searched for (normalized content for normalized tokens)
    int64_t id;
    bool special, normalized, lstrip, rstrip;
  };
  std::vector<Added> added;
  std::unordered_map<int64_t, bool> added_special;  // id -> special

  int64_t bos = 0, eos = 0, pad = 0, unk = 0;

  mutable std::mutex cache_mutex;
  mutable std::unordered_map<std::string, std::vector<int64_t>> cache;

  std::vector<int64_t> bpe(const std::string& piece) const;
  void split_added(const std::u32string& text, bool normalized_pass,
                   std::vector<Segment>& out) const;
  std::vector<int64_t> content_ids(std::string_view text) const;
};

namespace {

std::unordered_map<std::string, int64_t> read_vocab(const fs::path& path) {
  const std::string fix = "vocab.json must map every token to its id; " + kRecopyFix;
  json vocab_json = read_json_file(path, fix);
  if (!vocab_json.is_object() || vocab_json.empty()) {
    throw ModelError(path.string() + " must be a non-empty JSON object; " + fix);
  }
  std::unordered_map<std::string, int64_t> vocab;
  vocab.reserve(vocab_json.size());
  for (const auto& [token, id] : vocab_json.items()) {
    if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
        id.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
      throw ModelError(path.string() + ": the id of \"" + token +
                       "\" is not a non-negative integer; " + fix);
    }
    vocab.emplace(token, id.get<int64_t>());
  }
  return vocab;
}

}  // namespace

CLIPTokenizer::CLIPTokenizer(std::shared_ptr<State> state) : state_(std::move(state)) {}

CLIPTokenizer CLIPTokenizer::from_folder(const fs::path& tokenizer_dir) {
  if (!fs::is_directory(tokenizer_dir)) {
    throw ModelError(tokenizer_dir.string() +
                     " is not a directory: pass the model folder's tokenizer/ directory");
  }
  auto state = std::make_shared<State>();
  state->config = CLIPTokenizerConfig::from_folder(tokenizer_dir);

  const fs::path vocab_path = tokenizer_dir / "vocab.json";
  if (!fs::exists(vocab_path) && fs::exists(tokenizer_dir / "tokenizer.json")) {
    throw ModelError(vocab_path.string() +
                     " is missing (the folder has only tokenizer.json, as transformers 5 saves "
                     "it): sdtrain reads vocab.json + merges.txt; " +
                     kRecopyFix);
  }
  state->vocab = read_vocab(vocab_path);
  int64_t max_id = -1;
  for (const auto& [token, id] : state->vocab) max_id = std::max(max_id, id);
  state->model_vocab_size = max_id + 1;
  state->id_to_token.assign(static_cast<std::size_t>(max_id + 1), std::string());
  std::vector<bool> seen(static_cast<std::size_t>(max_id + 1), false);
  for (const auto& [token, id] : state->vocab) {
    if (seen[id]) {
      throw ModelError(vocab_path.string() + ": id " + std::to_string(id) +
                       " is used by two tokens; " + kRecopyFix);
    }
    seen[id] = true;
    state->id_to_token[id] = token;
  }

  // merges.txt: an optional "#version" first line, then one merge "a b" per line, in rank
  // order. Blank lines (the file's trailing newline) are skipped.
  const fs::path merges_path = tokenizer_dir / "merges.txt";
  if (!fs::is_regular_file(merges_path)) {
    throw ModelError(merges_path.string() + " is missing: " + kRecopyFix);
  }
  std::istringstream merges_text(read_text_file(merges_path));
  std::string line;
  int line_number = 0;
  int32_t rank = 0;
  while (std::getline(merges_text, line)) {
    ++line_number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty() || (line_number == 1 && line.rfind("#version", 0) == 0)) continue;
    auto space = line.find(' ');
    if (space == std::string::npos || space == 0 || space + 1 == line.size() ||
        line.find(' ', space + 1) != std::string::npos) {
      throw ModelError(merges_path.string() + " line " + std::to_string(line_number) +
                       ": expected two symbols separated by one space, found \"" + line + "\"; " +
                       kRecopyFix);
    }
    std::string a = line.substr(0, space), b = line.substr(space + 1);
    auto find = [&](const std::string& token) {
      auto it = state->vocab.find(token);
      if (it == state->vocab.end()) {
        throw ModelError(merges_path.string() + " line " + std::to_string(line_number) + ": \"" +
                         token +
                         "\" is not in vocab.json (merges.txt and vocab.json do not "
                         "belong together); " +
                         kRecopyFix);
      }
      return it->second;
    };
    int64_t id_a = find(a), id_b = find(b), id_merged = find(a + b);
    // The first occurrence of a pair keeps its rank, as the reference's merge map does.
    state->merges.emplace(pair_key(id_a, id_b), Merge{rank, id_merged});
    ++rank;
  }

  // Added tokens: the vocab's id when the content is in vocab.json, else the id from
  // added_tokens_decoder, else the next free id.
  std::map<std::string, std::size_t> index_of;  // content -> position in state->added
  int64_t next_id = state->model_vocab_size;
  for (const auto& token : state->config.added_tokens) {
    int64_t id;
    if (auto it = state->vocab.find(token.content); it != state->vocab.end()) {
      id = it->second;
      if (token.id >= 0 && token.id != id) {
        throw ModelError((tokenizer_dir / "tokenizer_config.json").string() +
                         ": added_tokens_decoder gives \"" + token.content + "\" the id " +
                         std::to_string(token.id) + ", but vocab.json gives it " +
                         std::to_string(id) + "; " + kRecopyFix);
      }
    } else if (auto seen_it = index_of.find(token.content); seen_it != index_of.end()) {
      id = state->added[seen_it->second].id;
    } else {
      id = token.id >= 0 ? token.id : next_id;
      if (id < state->model_vocab_size || (id < static_cast<int64_t>(state->id_to_token.size()) &&
                                           !state->id_to_token[id].empty())) {
        throw ModelError((tokenizer_dir / "tokenizer_config.json").string() + ": added token \"" +
                         token.content + "\" has id " + std::to_string(id) +
                         ", which vocab.json already uses; " + kRecopyFix);
      }
      if (static_cast<int64_t>(state->id_to_token.size()) <= id) state->id_to_token.resize(id + 1);
      state->id_to_token[id] = token.content;
      next_id = std::max(next_id, id + 1);
    }
    State::Added added{utf8_to_utf32(token.content),
                       id,
                       token.special,
                       token.normalized,
                       token.lstrip,
                       token.rstrip};
    if (auto it = index_of.find(token.content); it != index_of.end()) {
      state->added[it->second] = added;
    } else {
      index_of[token.content] = state->added.size();
      state->added.push_back(added);
    }
  }
  for (auto& added : state->added) {
    // transformers matches normalized tokens against normalized text, so it normalizes the
    // token's content too.
    if (added.normalized) added.pattern = normalize(added.pattern);
    state->added_special[added.id] = added.special;
  }

  auto named_id = [&](const std::string& content, const char* key) {
    auto it = state->vocab.find(content);
    if (it == state->vocab.end()) {
      throw ModelError((tokenizer_dir / "tokenizer_config.json").string() + " / " +
                       (tokenizer_dir / "special_tokens_map.json").string() + ": " + key + " \"" +
                       content +
                       "\" is not in vocab.json; the text encoder has no embedding for "
                       "it. " +
                       kRecopyFix);
    }
    return it->second;
  };
  state->bos = named_id(state->config.bos_token, "bos_token");
  state->eos = named_id(state->config.eos_token, "eos_token");
  state->unk = named_id(state->config.unk_token, "unk_token");
  state->pad = named_id(state->config.pad_token, "pad_token");
  return CLIPTokenizer(std::move(state));
}

// ---------------------------------------------------------------------------------------------
// Encoding

// Byte-level BPE of one pre-tokenized piece (UTF-8). Symbols start as the piece's bytes in
// CLIP's alphabet, the last with "</w>"; the pair of lowest merge rank (leftmost on ties) is
// merged until no pair has a merge. A heap of candidate pairs keeps this O(n log n).
std::vector<int64_t> CLIPTokenizer::State::bpe(const std::string& piece) const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (auto it = cache.find(piece); it != cache.end()) return it->second;
  }
  struct Symbol {
    int64_t id;
    int prev, next;
    bool alive;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  for (std::size_t i = 0; i < piece.size(); ++i) {
    std::string s = byte_symbols()[static_cast<uint8_t>(piece[i])];
    if (i + 1 == piece.size()) s += kEndOfWord;
    auto it = vocab.find(s);
    int n = static_cast<int>(symbols.size());
    symbols.push_back({it == vocab.end() ? unk : it->second, n - 1, n + 1, true});
  }
  if (!symbols.empty()) symbols.back().next = -1;

  struct Candidate {
    int32_t rank;
    int pos;  // index of the left symbol
    int64_t left_id, right_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int left) {
    if (left < 0) return;
    int right = symbols[left].next;
    if (right < 0) return;
    auto it = merges.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges.end())
      queue.push({it->second.rank, left, symbols[left].id, symbols[right].id});
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push(i);
  while (!queue.empty()) {
    Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0 || left.id != top.left_id) continue;
    Symbol& right = symbols[left.next];
    if (right.id != top.right_id) continue;
    left.id = merges.at(pair_key(top.left_id, top.right_id)).id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push(left.prev);
    push(top.pos);
  }
  std::vector<int64_t> ids;
  for (const auto& s : symbols) {
    if (s.alive) ids.push_back(s.id);
  }
  std::lock_guard<std::mutex> lock(cache_mutex);
  if (cache.size() < 10000) cache.emplace(piece, ids);
  return ids;
}

// Cuts the added tokens of one kind (normalized or not) out of `text`: leftmost match first,
// the longest where several start at the same place. lstrip/rstrip tokens take the
// whitespace beside them.
void CLIPTokenizer::State::split_added(const std::u32string& text, bool normalized_pass,
                                       std::vector<Segment>& out) const {
  std::size_t start_offset = 0, i = 0;
  while (i < text.size()) {
    const Added* best = nullptr;
    for (const auto& a : added) {
      if (a.normalized != normalized_pass || a.pattern.empty()) continue;
      if (starts_with_at(text, i, a.pattern) &&
          (!best || a.pattern.size() > best->pattern.size())) {
        best = &a;
      }
    }
    if (!best) {
      ++i;
      continue;
    }
    std::size_t start = i, stop = i + best->pattern.size();
    if (best->lstrip) {
      while (start > start_offset && is_space(text[start - 1])) --start;
    }
    if (best->rstrip) {
      while (stop < text.size() && is_space(text[stop])) ++stop;
    }
    if (start_offset < start) out.push_back({-1, text.substr(start_offset, start - start_offset)});
    out.push_back({best->id, {}});
    start_offset = stop;
    i = stop;
  }
  if (start_offset < text.size()) out.push_back({-1, text.substr(start_offset)});
}

std::vector<int64_t> CLIPTokenizer::State::content_ids(std::string_view text) const {
  std::vector<Segment> raw_split;
  split_added(utf8_to_utf32(text), false, raw_split);
  std::vector<Segment> segments;
  for (auto& segment : raw_split) {
    if (segment.token_id >= 0) {
      segments.push_back(std::move(segment));
    } else {
      split_added(normalize(segment.text), true, segments);
    }
  }
  std::vector<int64_t> ids;
  for (const auto& segment : segments) {
    if (segment.token_id >= 0) {
      ids.push_back(segment.token_id);
      continue;
    }
    for (const auto& piece : pre_tokenize(segment.text)) {
      auto piece_ids = bpe(utf32_to_utf8(piece));
      ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    }
  }
  return ids;
}

std::vector<int64_t> CLIPTokenizer::encode(std::string_view text) const {
  std::vector<int64_t> content = state_->content_ids(text);
  // truncation=True keeps the first model_max_length - 2 content ids (room for bos and eos).
  std::size_t keep = static_cast<std::size_t>(state_->config.model_max_length - 2);
  if (content.size() > keep) content.resize(keep);
  std::vector<int64_t> ids;
  ids.reserve(content.size() + 2);
  ids.push_back(state_->bos);
  ids.insert(ids.end(), content.begin(), content.end());
  ids.push_back(state_->eos);
  return ids;
}

std::vector<int64_t> CLIPTokenizer::encode_padded(std::string_view text) const {
  std::vector<int64_t> ids = encode(text);
  ids.resize(static_cast<std::size_t>(state_->config.model_max_length), state_->pad);
  return ids;
}

torch::Tensor CLIPTokenizer::encode_batch(const std::vector<std::string>& texts) const {
  const int64_t length = state_->config.model_max_length;
  auto batch = torch::empty({static_cast<int64_t>(texts.size()), length}, torch::kLong);  // [B, L]
  auto* data = batch.data_ptr<int64_t>();
  for (std::size_t b = 0; b < texts.size(); ++b) {
    auto ids = encode_padded(texts[b]);
    std::copy(ids.begin(), ids.end(), data + b * length);
  }
  return batch;
}

std::vector<std::string> CLIPTokenizer::tokenize(std::string_view text) const {
  std::vector<std::string> tokens;
  for (int64_t id : state_->content_ids(text)) tokens.push_back(state_->id_to_token[id]);
  return tokens;
}

std::string CLIPTokenizer::decode(const std::vector<int64_t>& ids, bool skip_special_tokens) const {
  std::string bytes;
  for (int64_t id : ids) {
    if (id < 0 || id >= static_cast<int64_t>(state_->id_to_token.size()) ||
        state_->id_to_token[id].empty()) {
      continue;  // unknown ids decode to nothing, as in the reference
    }
    auto special = state_->added_special.find(id);
    if (special != state_->added_special.end()) {
      if (skip_special_tokens && special->second) continue;
    }
    // Every token (added ones too) goes through the byte-level decoder; characters outside
    // CLIP's byte alphabet are kept as they are.
    for (char32_t c : utf8_to_utf32(state_->id_to_token[id])) {
      auto it = symbol_bytes().find(c);
      if (it != symbol_bytes().end()) {
        bytes.push_back(static_cast<char>(it->second));
      } else {
        append_utf8(bytes, c);
      }
    }
  }
  std::string text = lossy_utf8(bytes);
  // transformers' CLIPTokenizer then turns each "</w>" into a space and strips.
  std::string out;
  for (std::size_t i = 0; i < text.size();) {
    if (text.compare(i, kEndOfWord.size(), kEndOfWord) == 0) {
      out.push_back(' ');
      i += kEndOfWord.size();
    } else {
      out.push_back(text[i++]);
    }
  }
  // Python's str.strip(): Unicode whitespace plus the separators U+001C..U+001F.
  std::u32string chars = utf8_to_utf32(out);
  auto not_space = [](char32_t c) { return !(is_space(c) || (c >= 0x1C && c <= 0x1F)); };
  auto first = std::find_if(chars.begin(), chars.end(), not_space);
  auto last = std::find_if(chars.rbegin(), chars.rend(), not_space).base();
  return first < last ? utf32_to_utf8(std::u32string(first, last)) : std::string();
}

int64_t CLIPTokenizer::bos_id() const { return state_->bos; }
int64_t CLIPTokenizer::eos_id() const { return state_->eos; }
int64_t CLIPTokenizer::pad_id() const { return state_->pad; }
int64_t CLIPTokenizer::unk_id() const { return state_->unk; }
int64_t CLIPTokenizer::model_max_length() const { return state_->config.model_max_length; }
int64_t CLIPTokenizer::vocab_size() const {
  return static_cast<int64_t>(state_->id_to_token.size());
}
const CLIPTokenizerConfig& CLIPTokenizer::config() const { return state_->config; }

}  // namespace sdtrain::text
