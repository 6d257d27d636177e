#include "sdtrain/text/clip_tokenizer.h"
#include "sdtrain/text/bundled_tokenizer.h"

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <thread>

#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::text;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const char* kRegenerate =
    "The reference ids come from transformers' CLIPTokenizer (versions in the fixture). If the "
    "pinned reference changed on purpose, regenerate them with\n"
    "  ~/.cache/sdtrain/venv/bin/python tools/make_tokenizer_fixtures.py\n"
    "and record what changed in docs/tokenizer.md.";

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream out;
  out << in.rdbuf();
  return out.str();
}

void write_file(const fs::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
}

// CLIP's byte alphabet, written out independently of the library (docs/tokenizer.md, step 4).
std::vector<std::string> byte_alphabet() {
  std::vector<int> printable, codes;
  for (int b = 0; b < 256; ++b) {
    if ((b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE) printable.push_back(b);
  }
  codes = printable;
  int extra = 0;
  for (int b = 0; b < 256; ++b) {
    if (std::find(printable.begin(), printable.end(), b) == printable.end())
      codes.push_back(256 + extra++);
  }
  std::vector<std::string> symbols;
  for (int c : codes) {
    std::string s;
    if (c < 0x80) {
      s.push_back(static_cast<char>(c));
    } else {
      s.push_back(static_cast<char>(0xC0 | (c >> 6)));
      s.push_back(static_cast<char>(0x80 | (c & 0x3F)));
    }
    symbols.push_back(s);
  }
  return symbols;
}

// vocab.json + merges.txt of the full CLIP BPE (48,894 merges), derived from the committed
// merge list (data/clip/merges.txt) as tools/clip_bpe.py derives them: a derivation apart from
// the one the product makes (src/text/bundled_tokenizer.cpp), which a test compares.
void write_full_bpe(const fs::path& dir) {
  std::istringstream lines(read_file(sdtrain::testing::source_dir() / "data/clip/merges.txt"));
  std::string line;
  std::getline(lines, line);  // "#version: 0.2"
  const int kMerges = 49152 - 256 - 2;
  std::vector<std::string> merges;
  while (static_cast<int>(merges.size()) < kMerges && std::getline(lines, line))
    merges.push_back(line);
  ASSERT_EQ(static_cast<int>(merges.size()), kMerges);

  auto symbols = byte_alphabet();
  std::vector<std::string> vocab = symbols;
  for (const auto& s : symbols) vocab.push_back(s + "</w>");
  std::string merges_txt = "#version: 0.2\n";
  for (const auto& m : merges) {
    auto space = m.find(' ');
    vocab.push_back(m.substr(0, space) + m.substr(space + 1));
    merges_txt += m + "\n";
  }
  vocab.push_back("<|startoftext|>");
  vocab.push_back("<|endoftext|>");
  ASSERT_EQ(vocab.size(), 49408u);
  json vocab_json = json::object();
  for (std::size_t i = 0; i < vocab.size(); ++i) vocab_json[vocab[i]] = i;
  write_file(dir / "vocab.json", vocab_json.dump());
  write_file(dir / "merges.txt", merges_txt);
}

// A tokenizer/ folder for one of the reference layouts: "sd15" and "sd2" are the tokenizers
// sdtrain bundles for single-file bases (data/tokenizer/, written by write_bundled_tokenizer);
// the others the committed JSON files of tests/fixtures/tokenizer/<name>/ plus the full BPE;
// "demo" is the bundled tiny model's.
fs::path tokenizer_folder(const std::string& name) {
  if (name == "demo") return sdtrain::testing::source_dir() / "configs/demo/model/tokenizer";
  auto dir = sdtrain::testing::scratch_dir() / name;
  if (name == "sd15" || name == "sd2") {
    write_bundled_tokenizer(name == "sd2" ? BundledTokenizer::sd2 : BundledTokenizer::sd1, dir);
    return dir;
  }
  fs::create_directories(dir);
  for (const auto& entry : fs::directory_iterator(sdtrain::testing::fixture("tokenizer/" + name))) {
    fs::copy_file(entry.path(), dir / entry.path().filename());
  }
  write_full_bpe(dir);
  return dir;
}

const json& reference() {
  static const json data =
      json::parse(read_file(sdtrain::testing::fixture("tokenizer/reference_ids.json")));
  return data;
}

std::string escaped(const std::string& text) {
  return json(text).dump();  // shows control characters and keeps the rest readable
}

std::string ids_text(const std::vector<int64_t>& ids) { return json(ids).dump(); }

// A ModelError whose message names `needle`.
void expect_model_error(const std::function<void()>& load, const std::string& needle) {
  sdtrain::testing::expect_model_error(load, {needle});
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Parity with the reference on the committed corpus

class CLIPTokenizerParity : public ::testing::TestWithParam<std::string> {};

TEST_P(CLIPTokenizerParity, IdsAndDecodedTextMatchReference) {
  const std::string name = GetParam();
  const json& ref = reference();
  const json& folder = ref.at("folders").at(name);
  const json& prompts = ref.at("prompts");
  ASSERT_GE(prompts.size(), 300u) << "the corpus must hold at least 300 prompts. " << kRegenerate;

  auto tokenizer = CLIPTokenizer::from_folder(tokenizer_folder(name));
  EXPECT_EQ(tokenizer.bos_id(), folder.at("bos_id").get<int64_t>());
  EXPECT_EQ(tokenizer.eos_id(), folder.at("eos_id").get<int64_t>());
  EXPECT_EQ(tokenizer.pad_id(), folder.at("pad_id").get<int64_t>());
  EXPECT_EQ(tokenizer.unk_id(), folder.at("unk_id").get<int64_t>());
  const int64_t length = folder.at("model_max_length").get<int64_t>();
  EXPECT_EQ(tokenizer.model_max_length(), length);

  int id_mismatches = 0, decode_mismatches = 0;
  std::ostringstream report;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    const std::string text = prompts[i].at("text");
    const std::string category = prompts[i].at("category");
    auto expected = folder.at("ids")[i].get<std::vector<int64_t>>();
    auto got = tokenizer.encode(text);
    if (got != expected) {
      if (++id_mismatches <= 10) {
        report << "  [" << category << "] " << escaped(text) << "\n    reference "
               << ids_text(expected) << "\n    sdtrain   " << ids_text(got) << "\n";
      }
      continue;
    }
    auto padded = tokenizer.encode_padded(text);
    expected.resize(static_cast<std::size_t>(length), tokenizer.pad_id());
    if (padded != expected) {
      ++id_mismatches;
      report << "  padded [" << category << "] " << escaped(text) << "\n";
    }
    const std::string expected_text = folder.at("decoded")[i];
    auto decoded = tokenizer.decode(got);
    if (decoded != expected_text && ++decode_mismatches <= 10) {
      report << "  decode [" << category << "] " << escaped(text) << ": reference "
             << escaped(expected_text) << ", sdtrain " << escaped(decoded) << "\n";
    }
  }
  EXPECT_EQ(id_mismatches, 0) << id_mismatches << " of " << prompts.size() << " prompts differ ("
                              << name << ", first 10 shown):\n"
                              << report.str() << kRegenerate;
  EXPECT_EQ(decode_mismatches, 0) << report.str() << kRegenerate;
}

INSTANTIATE_TEST_SUITE_P(Folders, CLIPTokenizerParity,
                         ::testing::Values("sd2", "sd15", "sd2_added_tokens_decoder", "demo"));

// ---------------------------------------------------------------------------------------------
// Behaviours spelled out (independent of the fixture file)

TEST(CLIPTokenizer, BundledFilesAreTheDerivedBPEAndThePublishedConfigs) {
  const fs::path scratch = sdtrain::testing::scratch_dir();
  const fs::path bundled = scratch / "bundled";
  write_bundled_tokenizer(BundledTokenizer::sd2, bundled);
  const fs::path derived = scratch / "derived";
  fs::create_directories(derived);
  write_full_bpe(derived);
  EXPECT_EQ(json::parse(read_file(bundled / "vocab.json")), json::parse(read_file(derived / "vocab.json")));
  EXPECT_EQ(read_file(bundled / "merges.txt"), read_file(derived / "merges.txt"));
  for (const char* file : {"tokenizer_config.json", "special_tokens_map.json"})
    EXPECT_EQ(read_file(bundled / file), read_file(sdtrain::testing::source_dir() / "data/tokenizer/sd2" / file));
}

TEST(CLIPTokenizer, EncodesTheReferencePromptOfSharedReference) {
  auto tokenizer = CLIPTokenizer::from_folder(tokenizer_folder("sd15"));
  // docs/tokenizer.md; the same ids open_clip produces.
  std::vector<int64_t> expected = {49406, 320, 1125, 539, 550,  18376,
                                   6765,  320, 4558, 525, 7496, 49407};
  EXPECT_EQ(tokenizer.encode("a photo of an astronaut riding a horse on mars"), expected);
  EXPECT_EQ(tokenizer.encode("  A Photo\tOF an ASTRONAUT riding a horse on mars\n"), expected);
  EXPECT_EQ(tokenizer.decode(expected), "a photo of an astronaut riding a horse on mars");
  EXPECT_EQ(tokenizer.vocab_size(), 49408);
}

TEST(CLIPTokenizer, ExclamationIsAPadTokenOnlyInSd2Folders) {
  auto sd2 = CLIPTokenizer::from_folder(tokenizer_folder("sd2"));
  auto sd15 = CLIPTokenizer::from_folder(tokenizer_folder("sd15"));
  // SD 2's special_tokens_map.json registers "!" as a special token: every "!" is cut out
  // before BPE and becomes id 0 (diffusers #4153). SD 1.5 merges "!!" and "!!!" by BPE.
  EXPECT_EQ(sd2.encode("! !! !!!"), (std::vector<int64_t>{49406, 0, 0, 0, 0, 0, 0, 49407}));
  EXPECT_EQ(sd15.encode("! !! !!!"), (std::vector<int64_t>{49406, 256, 748, 995, 49407}));
  EXPECT_EQ(sd2.pad_id(), 0);
  EXPECT_EQ(sd15.pad_id(), 49407);
  auto padded = sd2.encode_padded("a dog");
  ASSERT_EQ(padded.size(), 77u);
  EXPECT_EQ(padded[3], 49407);
  EXPECT_EQ(padded[4], 0);
  EXPECT_EQ(padded[76], 0);
  EXPECT_EQ(sd15.encode_padded("a dog")[76], 49407);
}

TEST(CLIPTokenizer, SpecialTokenFlagsFollowTheLastRegistration) {
  auto sd2 = CLIPTokenizerConfig::from_folder(tokenizer_folder("sd2"));
  auto sd15 = CLIPTokenizerConfig::from_folder(tokenizer_folder("sd15"));
  auto flags_of = [](const CLIPTokenizerConfig& config, const std::string& content) {
    const AddedToken* last = nullptr;
    for (const auto& t : config.added_tokens) {
      if (t.content == content) last = &t;
    }
    return last;
  };
  EXPECT_EQ(sd2.pad_token, "!");
  EXPECT_EQ(sd15.pad_token, "<|endoftext|>");
  ASSERT_NE(flags_of(sd2, "!"), nullptr);
  EXPECT_FALSE(flags_of(sd2, "!")->normalized);
  // SD 2: eos/unk objects say normalized=true, so "<|ENDOFTEXT|>" matches after lowercasing.
  EXPECT_TRUE(flags_of(sd2, "<|endoftext|>")->normalized);
  // SD 1.5: pad_token is the plain string "<|endoftext|>", registered after eos/unk, which
  // makes the token normalized=false: "<|ENDOFTEXT|>" is then ordinary text.
  EXPECT_FALSE(flags_of(sd15, "<|endoftext|>")->normalized);
  auto t2 = CLIPTokenizer::from_folder(tokenizer_folder("sd2"));
  auto t15 = CLIPTokenizer::from_folder(tokenizer_folder("sd15"));
  EXPECT_EQ(t2.encode("<|ENDOFTEXT|>"), (std::vector<int64_t>{49406, 49407, 49407}));
  EXPECT_GT(t15.encode("<|ENDOFTEXT|>").size(), 3u);
}

TEST(CLIPTokenizer, AddedTokensDecoderTakesPrecedenceOverSpecialTokensMap) {
  // The fixture's special_tokens_map.json says pad "<|endoftext|>"; transformers does not read
  // it when tokenizer_config.json has added_tokens_decoder.
  auto tokenizer = CLIPTokenizer::from_folder(tokenizer_folder("sd2_added_tokens_decoder"));
  EXPECT_EQ(tokenizer.pad_id(), 0);
  EXPECT_EQ(tokenizer.config().pad_token, "!");
}

TEST(CLIPTokenizer, TruncatesToModelMaxLength) {
  auto tokenizer = CLIPTokenizer::from_folder(tokenizer_folder("sd15"));
  std::string text;
  for (int i = 0; i < 200; ++i) text += "a ";
  auto ids = tokenizer.encode(text);
  ASSERT_EQ(ids.size(), 77u);
  EXPECT_EQ(ids.front(), 49406);
  EXPECT_EQ(ids[75], 320);
  EXPECT_EQ(ids.back(), 49407);
  EXPECT_EQ(tokenizer.encode_padded(text), ids);
  EXPECT_EQ(tokenizer.encode(""), (std::vector<int64_t>{49406, 49407}));
  EXPECT_EQ(tokenizer.tokenize("sks dog"), (std::vector<std::string>{"sks</w>", "dog</w>"}));
}

TEST(CLIPTokenizer, BatchIsPaddedInt64Rows) {
  auto tokenizer = CLIPTokenizer::from_folder(tokenizer_folder("sd2"));
  std::vector<std::string> texts = {"a photo of sks dog", "", "wow!!!", std::string(300, 'x')};
  auto batch = tokenizer.encode_batch(texts);
  ASSERT_EQ(batch.sizes(), (std::vector<int64_t>{4, 77}));
  EXPECT_EQ(batch.scalar_type(), torch::kLong);
  for (std::size_t b = 0; b < texts.size(); ++b) {
    auto row = batch[static_cast<int64_t>(b)];
    std::vector<int64_t> got(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + 77);
    EXPECT_EQ(got, tokenizer.encode_padded(texts[b])) << b;
  }
  EXPECT_EQ(tokenizer.encode_batch({}).sizes(), (std::vector<int64_t>{0, 77}));
}

TEST(CLIPTokenizer, ConcurrentEncodingMatchesSerial) {
  auto folder = tokenizer_folder("sd2");
  auto warm = CLIPTokenizer::from_folder(folder);
  const json& prompts = reference().at("prompts");
  std::vector<std::vector<int64_t>> serial;
  for (const auto& p : prompts) serial.push_back(warm.encode(p.at("text").get<std::string>()));
  // A second tokenizer starts with an empty BPE cache, which four threads then fill at once.
  auto cold = CLIPTokenizer::from_folder(folder);
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (std::size_t i = 0; i < prompts.size(); ++i) {
        if (cold.encode(prompts[i].at("text").get<std::string>()) != serial[i]) ++failures[t];
      }
    });
  }
  for (auto& thread : threads) thread.join();
  for (int f : failures) EXPECT_EQ(f, 0);
}

TEST(CLIPTokenizer, InvalidUtf8IsReplacedNotRejected) {
  auto tokenizer = CLIPTokenizer::from_folder(tokenizer_folder("sd15"));
  // Like Python's bytes.decode(errors="replace"): the stray byte becomes U+FFFD.
  EXPECT_EQ(tokenizer.encode("x\xffz"), tokenizer.encode("x\xEF\xBF\xBDz"));
}

// ---------------------------------------------------------------------------------------------
// Bad folders: ModelError (exit code 3) naming the file

class CLIPTokenizerErrors : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = sdtrain::testing::scratch_dir() / "tokenizer";
    fs::copy(sdtrain::testing::source_dir() / "configs/demo/model/tokenizer", dir_);
  }
  fs::path dir_;
};

TEST_F(CLIPTokenizerErrors, MissingVocab) {
  fs::remove(dir_ / "vocab.json");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "vocab.json");
}

TEST_F(CLIPTokenizerErrors, OnlyTokenizerJsonSaysWhy) {
  fs::remove(dir_ / "vocab.json");
  write_file(dir_ / "tokenizer.json", "{}");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "tokenizer.json");
}

TEST_F(CLIPTokenizerErrors, MissingMerges) {
  fs::remove(dir_ / "merges.txt");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "merges.txt");
}

TEST_F(CLIPTokenizerErrors, MalformedMergesLine) {
  write_file(dir_ / "merges.txt", "#version: 0.2\ni n\nt h e\n");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "merges.txt line 3");
}

TEST_F(CLIPTokenizerErrors, MergeOutsideVocab) {
  write_file(dir_ / "merges.txt", "#version: 0.2\ni n\nq z\n");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "\"qz\" is not in vocab.json");
}

TEST_F(CLIPTokenizerErrors, VocabNotJson) {
  write_file(dir_ / "vocab.json", "{\"a\": 0,");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "vocab.json is not valid JSON");
}

TEST_F(CLIPTokenizerErrors, VocabIdNotInteger) {
  write_file(dir_ / "vocab.json", "{\"a\": \"zero\"}");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "vocab.json");
}

TEST_F(CLIPTokenizerErrors, MissingTokenizerConfig) {
  fs::remove(dir_ / "tokenizer_config.json");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "tokenizer_config.json is missing");
}

TEST_F(CLIPTokenizerErrors, MissingModelMaxLength) {
  write_file(dir_ / "tokenizer_config.json", "{\"tokenizer_class\": \"CLIPTokenizer\"}");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "model_max_length");
}

TEST_F(CLIPTokenizerErrors, OtherTokenizerClass) {
  write_file(dir_ / "tokenizer_config.json",
             "{\"tokenizer_class\": \"T5Tokenizer\", \"model_max_length\": 77}");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "T5Tokenizer");
}

TEST_F(CLIPTokenizerErrors, PadTokenOutsideVocab) {
  write_file(dir_ / "special_tokens_map.json", "{\"pad_token\": \"<pad>\"}");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); },
                     "pad_token \"<pad>\" is not in vocab.json");
}

TEST_F(CLIPTokenizerErrors, SpecialTokensMapNotJson) {
  write_file(dir_ / "special_tokens_map.json", "[");
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_); }, "special_tokens_map.json");
}

TEST_F(CLIPTokenizerErrors, NotADirectory) {
  expect_model_error([&] { CLIPTokenizer::from_folder(dir_ / "vocab.json"); }, "not a directory");
}
