// The public tokenizer: the folder's files put together, the added-token split, and
// encode/decode. The parts live apart so that each reads alone: unicode.cpp (UTF-8, the
// normalizer, character classes), pre_tokenizer.cpp (CLIP's and GPT-2's patterns),
// tokenizer_files.cpp and tokenizer_config.cpp (the folder's files) and clip_bpe.cpp (byte
// alphabet and BPE).
#include "sdtrain/text/clip_tokenizer.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <unordered_map>
#include <utility>

#include "clip_bpe.h"
#include "pre_tokenizer.h"
#include "sdtrain/util/error.h"
#include "tokenizer_files.h"
#include "unicode.h"

namespace sdtrain::text {

namespace fs = std::filesystem;
using detail::kRecopyFix;

namespace {

// One piece of text after the added-token split: either an added token's id, or text that
// still has to be (normalized,) pre-tokenized and merged.
struct Segment {
  int64_t token_id = -1;
  std::u32string text;
};

}  // namespace

// ---------------------------------------------------------------------------------------------
// Tokenizer state

struct CLIPTokenizer::State {
  CLIPTokenizerConfig config;
  detail::Vocab vocab;
  std::vector<std::string> id_to_token;  // model vocabulary and added tokens
  detail::MergeTable merges;
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

  void register_added_tokens(const fs::path& tokenizer_dir);
  int64_t added_token_id(const AddedToken& token,
                         const std::map<std::string, std::size_t>& index_of, int64_t& next_id,
                         const fs::path& tokenizer_dir);
  int64_t named_id(const std::string& content, const char* key,
                   const fs::path& tokenizer_dir) const;

  std::vector<int64_t> bpe(const std::string& piece) const;
  void split_added(const std::u32string& text, bool normalized_pass,
                   std::vector<Segment>& out) const;
  std::vector<int64_t> content_ids(std::string_view text) const;
};

// ---------------------------------------------------------------------------------------------
// Loading

CLIPTokenizer::CLIPTokenizer(std::shared_ptr<State> state) : state_(std::move(state)) {}

CLIPTokenizer CLIPTokenizer::from_folder(const fs::path& tokenizer_dir) {
  if (!fs::is_directory(tokenizer_dir)) {
    throw ModelError(tokenizer_dir.string() +
                     " is not a directory: pass the model folder's tokenizer/ directory");
  }
  auto state = std::make_shared<State>();
  state->config = CLIPTokenizerConfig::from_folder(tokenizer_dir);
  const fs::path vocab_path = tokenizer_dir / "vocab.json";
  state->vocab = detail::read_vocab(vocab_path);
  state->id_to_token = detail::tokens_by_id(state->vocab, vocab_path);
  state->model_vocab_size = static_cast<int64_t>(state->id_to_token.size());
  state->merges = detail::read_merges(tokenizer_dir / "merges.txt", state->vocab);
  state->register_added_tokens(tokenizer_dir);
  state->bos = state->named_id(state->config.bos_token, "bos_token", tokenizer_dir);
  state->eos = state->named_id(state->config.eos_token, "eos_token", tokenizer_dir);
  state->unk = state->named_id(state->config.unk_token, "unk_token", tokenizer_dir);
  state->pad = state->named_id(state->config.pad_token, "pad_token", tokenizer_dir);
  return CLIPTokenizer(std::move(state));
}

// Added tokens: the vocab's id when the content is in vocab.json, else the id from
// added_tokens_decoder, else the next free id. A content registered twice keeps its first id.
int64_t CLIPTokenizer::State::added_token_id(const AddedToken& token,
                                             const std::map<std::string, std::size_t>& index_of,
                                             int64_t& next_id, const fs::path& tokenizer_dir) {
  if (auto it = vocab.find(token.content); it != vocab.end()) {
    int64_t id = it->second;
    if (token.id >= 0 && token.id != id) {
      throw ModelError((tokenizer_dir / "tokenizer_config.json").string() +
                       ": added_tokens_decoder gives \"" + token.content + "\" the id " +
                       std::to_string(token.id) + ", but vocab.json gives it " +
                       std::to_string(id) + "; " + kRecopyFix);
    }
    return id;
  }
  if (auto seen = index_of.find(token.content); seen != index_of.end()) {
    return added[seen->second].id;
  }
  int64_t id = token.id >= 0 ? token.id : next_id;
  if (id < model_vocab_size ||
      (id < static_cast<int64_t>(id_to_token.size()) && !id_to_token[id].empty())) {
    throw ModelError((tokenizer_dir / "tokenizer_config.json").string() + ": added token \"" +
                     token.content + "\" has id " + std::to_string(id) +
                     ", which vocab.json already uses; " + kRecopyFix);
  }
  if (static_cast<int64_t>(id_to_token.size()) <= id) id_to_token.resize(id + 1);
  id_to_token[id] = token.content;
  next_id = std::max(next_id, id + 1);
  return id;
}

// config.added_tokens in registration order into `added` (one entry per content, the last
// registration's flags) and `id_to_token`, and which ids decode() may skip as special.
void CLIPTokenizer::State::register_added_tokens(const fs::path& tokenizer_dir) {
  std::map<std::string, std::size_t> index_of;  // content -> position in `added`
  int64_t next_id = model_vocab_size;
  for (const auto& token : config.added_tokens) {
    int64_t id = added_token_id(token, index_of, next_id, tokenizer_dir);
    Added entry{detail::utf8_to_utf32(token.content),
                id,
                token.special,
                token.normalized,
                token.lstrip,
                token.rstrip};
    if (auto it = index_of.find(token.content); it != index_of.end()) {
      added[it->second] = entry;
    } else {
      index_of[token.content] = added.size();
      added.push_back(entry);
    }
  }
  for (auto& entry : added) {
    // transformers matches normalized tokens against normalized text, so it normalizes the
    // token's content too.
    if (entry.normalized) entry.pattern = detail::normalize(entry.pattern);
    added_special[entry.id] = entry.special;
  }
}

// The id of the named special token `key` (bos_token, ...), which must be in vocab.json.
int64_t CLIPTokenizer::State::named_id(const std::string& content, const char* key,
                                       const fs::path& tokenizer_dir) const {
  auto it = vocab.find(content);
  if (it == vocab.end()) {
    throw ModelError((tokenizer_dir / "tokenizer_config.json").string() + " / " +
                     (tokenizer_dir / "special_tokens_map.json").string() + ": " + key + " \"" +
                     content +
                     "\" is not in vocab.json; the text encoder has no embedding for "
                     "it. " +
                     kRecopyFix);
  }
  return it->second;
}

// ---------------------------------------------------------------------------------------------
// Encoding

// Byte-level BPE of one pre-tokenized piece (UTF-8), through a cache of up to 10,000 pieces
// shared by the threads that encode.
std::vector<int64_t> CLIPTokenizer::State::bpe(const std::string& piece) const {
  {
    std::lock_guard<std::mutex> lock(cache_mutex);
    if (auto it = cache.find(piece); it != cache.end()) return it->second;
  }
  std::vector<int64_t> ids = detail::byte_pair_encode(piece, vocab, merges, unk);
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
      if (detail::starts_with_at(text, i, a.pattern) &&
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
      while (start > start_offset && detail::is_space(text[start - 1])) --start;
    }
    if (best->rstrip) {
      while (stop < text.size() && detail::is_space(text[stop])) ++stop;
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
  split_added(detail::utf8_to_utf32(text), false, raw_split);
  std::vector<Segment> segments;
  for (auto& segment : raw_split) {
    if (segment.token_id >= 0) {
      segments.push_back(std::move(segment));
    } else {
      split_added(detail::normalize(segment.text), true, segments);
    }
  }
  std::vector<int64_t> ids;
  for (const auto& segment : segments) {
    if (segment.token_id >= 0) {
      ids.push_back(segment.token_id);
      continue;
    }
    for (const auto& piece : detail::pre_tokenize(segment.text)) {
      auto piece_ids = bpe(detail::utf32_to_utf8(piece));
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

// ---------------------------------------------------------------------------------------------
// Decoding

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
    detail::append_token_bytes(bytes, state_->id_to_token[id]);
  }
  // transformers' CLIPTokenizer then turns each "</w>" into a space and strips (Python's
  // str.strip()).
  return detail::python_strip(detail::end_of_word_to_space(detail::lossy_utf8(bytes)));
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
