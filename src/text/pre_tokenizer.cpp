#include "pre_tokenizer.h"

#include <array>
#include <cstddef>

#include "unicode.h"

namespace sdtrain::text::detail {
namespace {

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

}  // namespace

// Each alternative of CLIP's pattern is a literal or one greedy class run, so trying them in
// order at each position is exactly the regex's leftmost-first match.
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

}  // namespace sdtrain::text::detail
