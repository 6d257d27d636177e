#pragma once
// Reading a tokenizer/ folder's files: the text and JSON readers, vocab.json and merges.txt
// (tokenizer_files.cpp). tokenizer_config.json and special_tokens_map.json are read by
// CLIPTokenizerConfig::from_folder (tokenizer_config.cpp) with these readers. Every error is a
// ModelError that names the file and the fix. Private to src/text.

#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "clip_bpe.h"

namespace sdtrain::text::detail {

// The fix every malformed tokenizer file gets: recopy the base model's tokenizer/ folder.
extern const std::string kRecopyFix;

std::string read_text_file(const std::filesystem::path& path);
// Throws ModelError ending in `fix` when the file is missing or not JSON.
nlohmann::json read_json_file(const std::filesystem::path& path, const std::string& fix);

// vocab.json: a non-empty object of token -> non-negative int32 id. A folder with
// tokenizer.json beside a missing vocab.json is told that sdtrain cannot read tokenizer.json.
Vocab read_vocab(const std::filesystem::path& vocab_path);
// The model vocabulary indexed by id (empty strings where vocab.json leaves a gap). Two tokens
// with one id are an error.
std::vector<std::string> tokens_by_id(const Vocab& vocab, const std::filesystem::path& vocab_path);
// merges.txt, every symbol checked against `vocab`.
MergeTable read_merges(const std::filesystem::path& merges_path, const Vocab& vocab);

}  // namespace sdtrain::text::detail
