#include "sdtrain/text/bundled_tokenizer.h"

#include <nlohmann/json.hpp>
#include <string>
#include <string_view>
#include <vector>

#include "clip_bpe.h"
#include "sdtrain/util/atomic_file.h"

extern "C" {
// bundled_data.S: NUL-terminated copies of the files under data/.
extern const char sdtrain_clip_merges[];
extern const char sdtrain_sd1_tokenizer_config[];
extern const char sdtrain_sd1_special_tokens_map[];
extern const char sdtrain_sd2_tokenizer_config[];
extern const char sdtrain_sd2_special_tokens_map[];
}

namespace sdtrain::text {
namespace {

bool printable_byte(int b) {  // the bytes CLIP's alphabet keeps as themselves
  return (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

// vocab.json of the full CLIP BPE: the 256 byte symbols (printable bytes first, in CLIP's
// bytes_to_unicode order), the same with "</w>", one entry per merge, then the two specials.
std::string derived_vocab(std::string_view merges) {
  std::vector<std::string> symbols;
  for (bool printable : {true, false})
    for (int b = 0; b < 256; ++b)
      if (printable_byte(b) == printable) symbols.push_back(detail::byte_symbols()[b]);
  std::vector<std::string> vocab = symbols;
  for (const auto& s : symbols) vocab.push_back(s + std::string(detail::kEndOfWord));
  std::size_t line_start = merges.find('\n') + 1;  // after "#version: 0.2"
  while (line_start < merges.size()) {
    std::size_t line_end = merges.find('\n', line_start);
    if (line_end == std::string_view::npos) line_end = merges.size();
    std::string_view line = merges.substr(line_start, line_end - line_start);
    const std::size_t space = line.find(' ');
    if (space != std::string_view::npos)
      vocab.push_back(std::string(line.substr(0, space)) + std::string(line.substr(space + 1)));
    line_start = line_end + 1;
  }
  vocab.push_back("<|startoftext|>");
  vocab.push_back("<|endoftext|>");
  nlohmann::json json = nlohmann::json::object();
  for (std::size_t i = 0; i < vocab.size(); ++i) json[vocab[i]] = i;
  return json.dump();
}

}  // namespace

void write_bundled_tokenizer(BundledTokenizer family, const std::filesystem::path& dir) {
  std::filesystem::create_directories(dir);
  const bool sd2 = family == BundledTokenizer::sd2;
  write_file_atomically(dir / "merges.txt", sdtrain_clip_merges);
  write_file_atomically(dir / "vocab.json", derived_vocab(sdtrain_clip_merges));
  write_file_atomically(dir / "tokenizer_config.json",
                        sd2 ? sdtrain_sd2_tokenizer_config : sdtrain_sd1_tokenizer_config);
  write_file_atomically(dir / "special_tokens_map.json",
                        sd2 ? sdtrain_sd2_special_tokens_map : sdtrain_sd1_special_tokens_map);
}

}  // namespace sdtrain::text
