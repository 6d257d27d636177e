// CLIPTokenizerConfig::from_folder: tokenizer_config.json and special_tokens_map.json combined
// as transformers 5 combines them (docs/tokenizer.md, "How the two JSON files combine").
#include <algorithm>
#include <array>
#include <map>
#include <utility>

#include "sdtrain/text/clip_tokenizer.h"
#include "sdtrain/util/error.h"
#include "tokenizer_files.h"

namespace sdtrain::text {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

using detail::kRecopyFix;
using detail::read_json_file;

const std::array<const char*, 7> kSpecialTokenKeys = {
    "bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"};

// The special tokens as the two files give them, before CLIPTokenizer's defaults fill the gaps.
struct SpecialTokens {
  std::map<std::string, AddedToken> named;  // kSpecialTokenKeys -> token
  std::vector<AddedToken> decoder;          // added_tokens_decoder, by increasing id
  std::vector<AddedToken> extra;            // additional_special_tokens, extra_special_tokens
};

json read_json_object(const fs::path& path) {
  json value = read_json_file(path, kRecopyFix);
  if (!value.is_object()) {
    throw ModelError(path.string() + " must hold a JSON object; " + kRecopyFix);
  }
  return value;
}

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

void check_tokenizer_class(const json& tokenizer_config, const fs::path& config_path) {
  auto it = tokenizer_config.find("tokenizer_class");
  if (it == tokenizer_config.end()) return;
  std::string name = it->is_string() ? it->get<std::string>() : it->dump();
  if (name != "CLIPTokenizer" && name != "CLIPTokenizerFast") {
    throw ModelError(config_path.string() + ": tokenizer_class is " + name +
                     ", but Stable Diffusion 1.x/2.x models use CLIPTokenizer; check that "
                     "this is the model folder's tokenizer/ directory");
  }
}

int64_t read_model_max_length(const json& tokenizer_config, const fs::path& config_path) {
  auto max_length = tokenizer_config.find("model_max_length");
  if (max_length == tokenizer_config.end() || !max_length->is_number_integer() ||
      max_length->get<int64_t>() < 2 || max_length->get<int64_t>() > 1000000) {
    throw ModelError(config_path.string() +
                     ": needs an integer \"model_max_length\" (77 for Stable Diffusion); add "
                     "\"model_max_length\": 77 or " +
                     kRecopyFix);
  }
  return max_length->get<int64_t>();
}

// The keys of kSpecialTokenKeys that `file_json` sets; each replaces an earlier value.
void read_named_tokens(const json& file_json, const fs::path& file, bool special_by_default,
                       std::map<std::string, AddedToken>& named) {
  for (const char* key : kSpecialTokenKeys) {
    if (auto it = file_json.find(key); it != file_json.end() && !it->is_null()) {
      named[key] = parse_token_value(*it, special_by_default, file, key);
    }
  }
}

void read_extra_tokens(const json& file_json, const fs::path& file, bool special_by_default,
                       std::vector<AddedToken>& extra) {
  for (const char* key : {"additional_special_tokens", "extra_special_tokens"}) {
    auto it = file_json.find(key);
    if (it == file_json.end() || it->is_null()) continue;
    if (!it->is_array()) {
      throw ModelError(file.string() + ": \"" + key + "\" must be a list; " + kRecopyFix);
    }
    // Lists from both files are merged, keeping the first of each content.
    for (const auto& value : *it) {
      AddedToken token = parse_token_value(value, special_by_default, file, key);
      bool known = std::any_of(extra.begin(), extra.end(),
                               [&](const AddedToken& t) { return t.content == token.content; });
      if (!known) extra.push_back(token);
    }
  }
}

// A key of added_tokens_decoder: a non-negative decimal token id.
int64_t parse_decoder_id(const std::string& index, const fs::path& config_path) {
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
  return id;
}

// added_tokens_decoder's entries with their ids, in increasing id order.
std::vector<AddedToken> read_added_tokens_decoder(const json& decoder,
                                                  const fs::path& config_path) {
  if (!decoder.is_object()) {
    throw ModelError(config_path.string() + ": \"added_tokens_decoder\" must be an object; " +
                     kRecopyFix);
  }
  std::vector<std::pair<int64_t, AddedToken>> by_id;
  for (const auto& [index, value] : decoder.items()) {
    int64_t id = parse_decoder_id(index, config_path);
    AddedToken token =
        parse_token_value(value, false, config_path, "added_tokens_decoder." + index);
    token.id = id;
    by_id.emplace_back(id, token);
  }
  std::sort(by_id.begin(), by_id.end(),
            [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<AddedToken> tokens;
  for (auto& [id, token] : by_id) tokens.push_back(token);
  return tokens;
}

// A named token given as a string takes the flags of its added_tokens_decoder entry.
void take_decoder_flags(std::map<std::string, AddedToken>& named,
                        const std::vector<AddedToken>& decoder_tokens) {
  for (auto& [key, token] : named) {
    for (const auto& d : decoder_tokens) {
      if (d.content == token.content) token = d;
    }
  }
}

// The content of the named token `key`; CLIPTokenizer's own default (registered as a plain
// special token) when neither file names it.
std::string content_or_default(std::map<std::string, AddedToken>& named, const char* key,
                               const std::string& fallback) {
  auto it = named.find(key);
  if (it != named.end()) return it->second.content;
  AddedToken token;
  token.content = fallback;
  named[key] = token;
  return fallback;
}

// The added vocabulary in transformers' registration order: added_tokens_decoder, the named
// tokens in kSpecialTokenKeys order, then the additional ones, the last two always special.
std::vector<AddedToken> registration_order(const SpecialTokens& tokens) {
  std::vector<AddedToken> added = tokens.decoder;
  for (const char* key : kSpecialTokenKeys) {
    if (auto it = tokens.named.find(key); it != tokens.named.end()) {
      AddedToken token = it->second;
      token.special = true;
      added.push_back(token);
    }
  }
  for (AddedToken token : tokens.extra) {
    token.special = true;
    added.push_back(token);
  }
  return added;
}

}  // namespace

CLIPTokenizerConfig CLIPTokenizerConfig::from_folder(const fs::path& tokenizer_dir) {
  const fs::path config_path = tokenizer_dir / "tokenizer_config.json";
  const fs::path map_path = tokenizer_dir / "special_tokens_map.json";
  json tokenizer_config = read_json_object(config_path);
  check_tokenizer_class(tokenizer_config, config_path);
  CLIPTokenizerConfig config;
  config.model_max_length = read_model_max_length(tokenizer_config, config_path);

  // Named special tokens: tokenizer_config.json, overridden by special_tokens_map.json unless
  // the config carries added_tokens_decoder (then transformers never opens the map file).
  SpecialTokens tokens;
  read_named_tokens(tokenizer_config, config_path, false, tokens.named);
  read_extra_tokens(tokenizer_config, config_path, false, tokens.extra);
  if (auto decoder = tokenizer_config.find("added_tokens_decoder");
      decoder != tokenizer_config.end()) {
    tokens.decoder = read_added_tokens_decoder(*decoder, config_path);
    take_decoder_flags(tokens.named, tokens.decoder);
  } else if (fs::exists(map_path)) {
    json map = read_json_object(map_path);
    read_named_tokens(map, map_path, true, tokens.named);
    read_extra_tokens(map, map_path, true, tokens.extra);
  }

  // CLIPTokenizer's own defaults for whatever neither file names.
  config.bos_token = content_or_default(tokens.named, "bos_token", "<|startoftext|>");
  config.eos_token = content_or_default(tokens.named, "eos_token", "<|endoftext|>");
  config.unk_token = content_or_default(tokens.named, "unk_token", "<|endoftext|>");
  config.pad_token = content_or_default(tokens.named, "pad_token", "<|endoftext|>");
  config.added_tokens = registration_order(tokens);
  return config;
}

}  // namespace sdtrain::text
