#pragma once
// The CLIP tokenizer of Stable Diffusion 1.x and 2.x, bundled in the binary (data/): the CLIP
// BPE merges (data/clip/README.md), with vocab.json derived from them (docs/tokenizer.md, step
// 4), and each family's tokenizer_config.json / special_tokens_map.json as the published
// folders have them. The two differ only in the pad token: "<|endoftext|>" (SD 1.x) and "!"
// (SD 2.x). A single-file base has no tokenizer folder; this one is written in its place.

#include <filesystem>

namespace sdtrain::text {

enum class BundledTokenizer { sd1, sd2 };

// Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json into `dir`
// (created), a tokenizer/ folder CLIPTokenizer::from_folder and transformers both read.
void write_bundled_tokenizer(BundledTokenizer family, const std::filesystem::path& dir);

}  // namespace sdtrain::text
