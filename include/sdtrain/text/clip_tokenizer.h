#pragma once
// CLIP's byte-level BPE tokenizer, read from a diffusers model folder's tokenizer/ directory
// (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).
//
// The behaviour matched is transformers' CLIPTokenizer as diffusers loads it, at the pinned
// reference version (transformers 5.x, which runs the Rust `tokenizers` pipeline):
//   1. added tokens (the special tokens, and SD 2's pad "!") are cut out of the text first:
//      tokens with normalized=false on the raw text, then the rest on the normalized text;
//   2. each remaining piece is normalized: NFC, every whitespace run -> " ", lowercase;
//   3. pre-tokenized with CLIP's pattern (contractions, letter runs, single digits, runs of
//      anything else; whitespace dropped), then GPT-2's byte-level pattern;
//   4. each piece's UTF-8 bytes are mapped to CLIP's printable byte alphabet and merged by
//      BPE, the last symbol carrying "</w>".
// encode() adds <|startoftext|> ... <|endoftext|> and keeps the first model_max_length - 2
// content ids (transformers' truncation=True). docs/tokenizer.md records the details and how
// they differ from transformers 4.x and open_clip.

#include <torch/types.h>

#include <cstdint>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sdtrain::text {

// One entry of the added vocabulary (transformers' AddedToken). Added tokens are matched in the
// text before BPE and always map to their own id.
struct AddedToken {
  std::string content;
  bool special = true;
  bool normalized = false;  // matched on the normalized (lowercased) text, not the raw text
  bool lstrip = false;      // swallows whitespace on its left
  bool rstrip = false;      // swallows whitespace on its right
  int64_t id = -1;          // from added_tokens_decoder; -1: the vocab's id (or the next free id)
};

// tokenizer_config.json and special_tokens_map.json, combined as transformers 5 combines them:
// special_tokens_map.json overrides tokenizer_config.json, unless tokenizer_config.json has an
// "added_tokens_decoder" (folders saved by transformers >= 4.34), in which case the map file is
// not read at all.
struct CLIPTokenizerConfig {
  std::string bos_token = "<|startoftext|>";
  std::string eos_token = "<|endoftext|>";
  std::string unk_token = "<|endoftext|>";
  std::string pad_token = "<|endoftext|>";
  int64_t model_max_length = 77;
  // In registration order; when a content appears twice, the later entry's flags apply
  // (transformers registers the named special tokens after added_tokens_decoder, in the
  // order bos, eos, unk, sep, pad, cls, mask, then additional special tokens).
  std::vector<AddedToken> added_tokens;

  // Reads and validates the two JSON files of `tokenizer_dir`. Throws ModelError naming the
  // file and the fix.
  static CLIPTokenizerConfig from_folder(const std::filesystem::path& tokenizer_dir);
};

class CLIPTokenizer {
 public:
  // `tokenizer_dir` is a model folder's tokenizer/ directory. Throws ModelError (exit code 3)
  // naming the file for a missing or malformed file.
  static CLIPTokenizer from_folder(const std::filesystem::path& tokenizer_dir);

  // <|startoftext|> + ids + <|endoftext|>, at most model_max_length ids.
  std::vector<int64_t> encode(std::string_view text) const;
  // encode() padded with pad_id() to exactly model_max_length ids (what diffusers feeds the
  // text encoder: padding="max_length", truncation=True).
  std::vector<int64_t> encode_padded(std::string_view text) const;
  // encode_padded() for each text. [B, model_max_length] int64 on the CPU.
  torch::Tensor encode_batch(const std::vector<std::string>& texts) const;
  // The token strings of the content (no bos/eos, no truncation), for diagnostics.
  std::vector<std::string> tokenize(std::string_view text) const;
  // Text for diagnostics: byte-level decoding, "</w>" -> " ", trimmed; as transformers'
  // decode(ids, skip_special_tokens=...) does. Invalid UTF-8 becomes U+FFFD.
  std::string decode(const std::vector<int64_t>& ids, bool skip_special_tokens = true) const;

  int64_t bos_id() const;
  int64_t eos_id() const;
  int64_t pad_id() const;
  int64_t unk_id() const;
  int64_t model_max_length() const;
  // Model vocabulary plus added tokens that are not in it.
  int64_t vocab_size() const;
  const CLIPTokenizerConfig& config() const;

 private:
  struct State;
  explicit CLIPTokenizer(std::shared_ptr<State> state);
  // Shared, immutable apart from the BPE cache (which has its own lock), so copies are cheap
  // and encode() may be called from several threads.
  std::shared_ptr<State> state_;
};

}  // namespace sdtrain::text
