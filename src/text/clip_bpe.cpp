#include "clip_bpe.h"

#include <functional>
#include <queue>

#include "unicode.h"

namespace sdtrain::text::detail {
namespace {

// CLIP's byte alphabet: the 188 printable bytes map to themselves, the other 68 to U+0100 +
// n in increasing byte order (docs/tokenizer.md, step 4). Entries are UTF-8.
std::array<std::string, 256> make_byte_symbols() {
  std::array<std::string, 256> symbols;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
    std::string s;
    append_utf8(s, printable ? static_cast<char32_t>(b) : static_cast<char32_t>(256 + extra++));
    symbols[b] = s;
  }
  return symbols;
}

// The inverse of byte_symbols(): symbol (one code point) -> byte.
const std::unordered_map<char32_t, uint8_t>& symbol_bytes() {
  static const auto table = [] {
    std::unordered_map<char32_t, uint8_t> t;
    for (int b = 0; b < 256; ++b) t[utf8_to_utf32(byte_symbols()[b])[0]] = static_cast<uint8_t>(b);
    return t;
  }();
  return table;
}

struct Symbol {
  int64_t id;
  int prev, next;
  bool alive;
};

// The piece's bytes in CLIP's alphabet, the last with "</w>", as a linked list of vocab ids.
std::vector<Symbol> initial_symbols(const std::string& piece, const Vocab& vocab, int64_t unk_id) {
  std::vector<Symbol> symbols;
  symbols.reserve(piece.size());
  for (std::size_t i = 0; i < piece.size(); ++i) {
    std::string s = byte_symbols()[static_cast<uint8_t>(piece[i])];
    if (i + 1 == piece.size()) s += kEndOfWord;
    auto it = vocab.find(s);
    int n = static_cast<int>(symbols.size());
    symbols.push_back({it == vocab.end() ? unk_id : it->second, n - 1, n + 1, true});
  }
  if (!symbols.empty()) symbols.back().next = -1;
  return symbols;
}

struct Candidate {
  int32_t rank;
  int pos;  // index of the left symbol
  int64_t left_id, right_id;
  bool operator>(const Candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
};

}  // namespace

uint64_t pair_key(int64_t a, int64_t b) {
  return (static_cast<uint64_t>(a) << 32) | static_cast<uint64_t>(static_cast<uint32_t>(b));
}

const std::array<std::string, 256>& byte_symbols() {
  static const auto symbols = make_byte_symbols();
  return symbols;
}

// Symbols start as the piece's bytes in CLIP's alphabet, the last with "</w>"; the pair of
// lowest merge rank (leftmost on ties) is merged until no pair has a merge. A heap of
// candidate pairs keeps this O(n log n).
std::vector<int64_t> byte_pair_encode(const std::string& piece, const Vocab& vocab,
                                      const MergeTable& merges, int64_t unk_id) {
  std::vector<Symbol> symbols = initial_symbols(piece, vocab, unk_id);
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<Candidate>> queue;
  auto push = [&](int left) {
    if (left < 0) return;
    int right = symbols[left].next;
    if (right < 0) return;
    auto it = merges.find(pair_key(symbols[left].id, symbols[right].id));
    if (it != merges.end())
      queue.push({it->second.rank, left, symbols[left].id, symbols[right].id});
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push(i);
  while (!queue.empty()) {
    Candidate top = queue.top();
    queue.pop();
    Symbol& left = symbols[top.pos];
    if (!left.alive || left.next < 0 || left.id != top.left_id) continue;
    Symbol& right = symbols[left.next];
    if (right.id != top.right_id) continue;
    left.id = merges.at(pair_key(top.left_id, top.right_id)).id;
    right.alive = false;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.pos;
    push(left.prev);
    push(top.pos);
  }
  std::vector<int64_t> ids;
  for (const auto& s : symbols) {
    if (s.alive) ids.push_back(s.id);
  }
  return ids;
}

void append_token_bytes(std::string& bytes, std::string_view token) {
  for (char32_t c : utf8_to_utf32(token)) {
    auto it = symbol_bytes().find(c);
    if (it != symbol_bytes().end()) {
      bytes.push_back(static_cast<char>(it->second));
    } else {
      append_utf8(bytes, c);
    }
  }
}

std::string end_of_word_to_space(std::string_view text) {
  std::string out;
  for (std::size_t i = 0; i < text.size();) {
    if (text.compare(i, kEndOfWord.size(), kEndOfWord) == 0) {
      out.push_back(' ');
      i += kEndOfWord.size();
    } else {
      out.push_back(text[i++]);
    }
  }
  return out;
}

}  // namespace sdtrain::text::detail
