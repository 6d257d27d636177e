#include "unicode.h"

#include <unicode/normalizer2.h>
#include <unicode/uchar.h>
#include <unicode/unistr.h>
#include <unicode/ustring.h>
#include <unicode/utf8.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

namespace sdtrain::text::detail {
namespace {

// NFC through ICU. ASCII text is already in NFC; callers skip it.
std::u32string to_nfc(std::u32string_view text) {
  UErrorCode status = U_ZERO_ERROR;
  const icu::Normalizer2* normalizer = icu::Normalizer2::getNFCInstance(status);
  if (U_FAILURE(status)) throw std::runtime_error("ICU's NFC normalizer is unavailable");
  icu::UnicodeString source = icu::UnicodeString::fromUTF32(
      reinterpret_cast<const UChar32*>(text.data()), static_cast<int32_t>(text.size()));
  icu::UnicodeString result = normalizer->normalize(source, status);
  if (U_FAILURE(status)) throw std::runtime_error("ICU NFC normalization failed");
  std::u32string nfc(result.countChar32(), U'\0');
  UErrorCode convert_status = U_ZERO_ERROR;
  result.toUTF32(reinterpret_cast<UChar32*>(nfc.data()), static_cast<int32_t>(nfc.size()),
                 convert_status);
  return nfc;
}

// The full lowercase mapping of one code point, without context (it may be several code
// points). A code point ICU cannot map is kept as it is.
void append_lowercase(std::u32string& out, char32_t c) {
  if (c < 0x80) {
    out.push_back(c >= 'A' && c <= 'Z' ? c + ('a' - 'A') : c);
    return;
  }
  UChar source[2];
  int32_t source_length = 0;
  U16_APPEND_UNSAFE(source, source_length, static_cast<UChar32>(c));
  UChar lower[8];
  UErrorCode status = U_ZERO_ERROR;
  int32_t n = u_strToLower(lower, 8, source, source_length, "", &status);
  if (U_FAILURE(status)) {
    out.push_back(c);
    return;
  }
  for (int32_t j = 0; j < n;) {
    UChar32 lc;
    U16_NEXT(lower, j, n, lc);
    out.push_back(static_cast<char32_t>(lc));
  }
}

}  // namespace

bool is_letter(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_L_MASK) != 0; }
bool is_number(char32_t c) { return (U_GET_GC_MASK(static_cast<UChar32>(c)) & U_GC_N_MASK) != 0; }
bool is_space(char32_t c) { return u_isUWhiteSpace(static_cast<UChar32>(c)) != 0; }
bool is_other(char32_t c) { return !is_space(c) && !is_letter(c) && !is_number(c); }

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

std::u32string normalize(std::u32string_view text) {
  // ASCII text is already in NFC.
  bool ascii = std::all_of(text.begin(), text.end(), [](char32_t c) { return c < 0x80; });
  std::u32string nfc_storage;
  if (!ascii) nfc_storage = to_nfc(text);
  std::u32string_view nfc = ascii ? text : std::u32string_view(nfc_storage);
  std::u32string out;
  out.reserve(nfc.size());
  for (std::size_t i = 0; i < nfc.size(); ++i) {
    char32_t c = nfc[i];
    if (is_space(c)) {
      while (i + 1 < nfc.size() && is_space(nfc[i + 1])) ++i;
      out.push_back(U' ');
    } else {
      append_lowercase(out, c);
    }
  }
  return out;
}

bool starts_with_at(std::u32string_view text, std::size_t at, std::u32string_view prefix) {
  return text.size() - at >= prefix.size() && text.compare(at, prefix.size(), prefix) == 0;
}

std::string python_strip(std::string_view text) {
  std::u32string chars = utf8_to_utf32(text);
  auto not_space = [](char32_t c) { return !(is_space(c) || (c >= 0x1C && c <= 0x1F)); };
  auto first = std::find_if(chars.begin(), chars.end(), not_space);
  auto last = std::find_if(chars.rbegin(), chars.rend(), not_space).base();
  return first < last ? utf32_to_utf8(std::u32string(first, last)) : std::string();
}

}  // namespace sdtrain::text::detail
