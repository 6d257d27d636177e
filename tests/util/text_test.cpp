// printable(): messages quote bytes from files; invalid UTF-8 and control bytes must reach the
// terminal as \xNN, valid UTF-8 (accents, CJK, emoji) unchanged.
#include <gtest/gtest.h>

#include "sdtrain/util/text.h"

namespace sdtrain {
namespace {

TEST(Printable, KeepsValidUtf8AndEscapesEverythingElse) {
  EXPECT_EQ(printable("caf\xc3\xa9 \xe7\x8c\xab \xf0\x9f\x90\x88\nnext\tcol"), "caf\xc3\xa9 \xe7\x8c\xab \xf0\x9f\x90\x88\nnext\tcol");
  EXPECT_EQ(printable("last read: '\"\xff\xfe'"), "last read: '\"\\xff\\xfe'");
  EXPECT_EQ(printable("\x1b[2Jbell\x07"), "\\x1b[2Jbell\\x07");
  EXPECT_EQ(printable("overlong \xc0\xaf"), "overlong \\xc0\\xaf");
  EXPECT_EQ(printable("surrogate \xed\xa0\x80"), "surrogate \\xed\\xa0\\x80");
  EXPECT_EQ(printable("past U+10FFFF \xf4\x90\x80\x80"), "past U+10FFFF \\xf4\\x90\\x80\\x80");
  EXPECT_EQ(printable("cut \xe7\x8c"), "cut \\xe7\\x8c");
  EXPECT_EQ(printable(std::string("nul\0byte", 8)), "nul\\x00byte");
}

TEST(Printable, ItsOutputIsAlwaysValidUtf8) {
  std::string every_byte;
  for (int b = 0; b < 256; ++b) every_byte += static_cast<char>(b);
  EXPECT_FALSE(is_valid_utf8(every_byte));
  EXPECT_TRUE(is_valid_utf8(printable(every_byte)));
  EXPECT_TRUE(is_valid_utf8("\xf0\x9f\x90\x88"));
  EXPECT_FALSE(is_valid_utf8("\xf0\x9f\x90"));
}

}  // namespace
}  // namespace sdtrain
