#pragma once
// CLIP's byte-level BPE: the byte alphabet, the merge table, the merging of one pre-tokenized
// piece into ids, and the byte-level decoder that undoes it (docs/tokenizer.md, step 4).
// Private to src/text.

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sdtrain::text::detail {

// vocab.json: token string (in CLIP's byte alphabet) -> id.
using Vocab = std::unordered_map<std::string, int64_t>;

struct Merge {
  int32_t rank;
  int64_t id;  // id of the merged symbol
};
// merges.txt, keyed by pair_key(left id, right id).
using MergeTable = std::unordered_map<uint64_t, Merge>;

uint64_t pair_key(int64_t a, int64_t b);

// Marks the last symbol of a word.
inline constexpr std::string_view kEndOfWord = "</w>";

// CLIP's byte alphabet: byte -> its symbol, UTF-8.
const std::array<std::string, 256>& byte_symbols();

// Byte-level BPE of one pre-tokenized piece (UTF-8). A symbol missing from `vocab` becomes
// `unk_id`.
std::vector<int64_t> byte_pair_encode(const std::string& piece, const Vocab& vocab,
                                      const MergeTable& merges, int64_t unk_id);

// Appends the bytes that one token string stands for: each symbol of CLIP's byte alphabet
// becomes its byte; characters outside the alphabet are kept as they are (UTF-8).
void append_token_bytes(std::string& bytes, std::string_view token);

// Each "</w>" in `text` replaced by a space, as transformers' CLIPTokenizer decodes.
std::string end_of_word_to_space(std::string_view text);

}  // namespace sdtrain::text::detail
