#pragma once
// The Unicode side of CLIP's tokenizer: UTF-8 <-> UTF-32, the normalizer, and the character
// classes its patterns use. ICU supplies the categories, NFC and case mapping
// (docs/tokenizer.md, "Implementation notes"). Private to src/text.

#include <cstddef>
#include <string>
#include <string_view>

namespace sdtrain::text::detail {

// \p{L} and \p{N}: ICU's general categories.
bool is_letter(char32_t c);
bool is_number(char32_t c);
// The Rust regex engine's \s and Rust's char::is_whitespace are both the Unicode White_Space
// property (so U+0085 and U+3000 are whitespace, U+200B and U+001C are not).
bool is_space(char32_t c);
// [^\s\p{L}\p{N}]: what the patterns' last alternative matches.
bool is_other(char32_t c);

// Invalid UTF-8 becomes U+FFFD, as Python's bytes.decode(errors="replace") would make it.
std::u32string utf8_to_utf32(std::string_view text);
// A code point that UTF-8 cannot hold becomes U+FFFD.
void append_utf8(std::string& out, char32_t c);
std::string utf32_to_utf8(std::u32string_view text);
// `bytes` with every invalid UTF-8 sequence replaced by U+FFFD.
std::string lossy_utf8(std::string_view bytes);

// The normalizer of transformers 5's CLIPTokenizer: NFC, every \s+ run -> " ", lowercase.
// Lowercasing is per code point with the full (not the simple) mapping and no context, as
// Rust's char::to_lowercase does: "İ" -> "i̇", and a final "Σ" -> "σ" (not "ς").
std::u32string normalize(std::u32string_view text);

// Whether `prefix` occurs in `text` at position `at`.
bool starts_with_at(std::u32string_view text, std::size_t at, std::u32string_view prefix);

// Python's str.strip() of UTF-8 text: Unicode whitespace plus the separators U+001C..U+001F.
std::string python_strip(std::string_view text);

}  // namespace sdtrain::text::detail
