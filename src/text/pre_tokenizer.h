#pragma once
// CLIP's pre-tokenizer: the normalized text cut into the pieces that BPE merges one at a time
// (docs/tokenizer.md, step 3). Private to src/text.

#include <string>
#include <string_view>
#include <vector>

namespace sdtrain::text::detail {

// CLIP's pattern, kept matches only (whitespace between them is dropped):
//   <\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+
// then GPT-2's byte-level pattern over each match. Digits are split one at a time.
std::vector<std::u32string> pre_tokenize(std::u32string_view text);

}  // namespace sdtrain::text::detail
