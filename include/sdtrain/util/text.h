#pragma once
// Messages quote paths, keys and bytes from files the user gave us. A broken file can hold
// anything, and echoing its raw bytes puts invalid UTF-8 or terminal control sequences on the
// user's screen and into CI logs; every message goes through printable() on its way out.

#include <string>
#include <string_view>

namespace sdtrain {

// `text` with every byte that is not part of valid UTF-8, and every control character other
// than newline and tab, written as \xNN. Valid UTF-8 text comes back unchanged.
std::string printable(std::string_view text);

// True when `text` is well-formed UTF-8 (no overlong forms, surrogates or values past U+10FFFF).
bool is_valid_utf8(std::string_view text);

}  // namespace sdtrain
