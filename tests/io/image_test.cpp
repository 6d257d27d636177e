#include "sdtrain/io/image.h"

#include <gtest/gtest.h>

#include <cmath>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"
#include "test_support.h"

using namespace sdtrain;
using namespace sdtrain::io;

namespace {

std::filesystem::path images() { return sdtrain::testing::fixture("images"); }

Image expected_for(const std::string& name) {
  std::string stem = std::filesystem::path(name).stem().string();
  std::string ext = std::filesystem::path(name).extension().string().substr(1);
  return read_image(images() / (stem + "_" + ext + ".expected.png"));
}

struct Difference {
  double mean = 0;
  int max = 0;
};

Difference compare(const Image& a, const Image& b) {
  Difference d;
  for (std::size_t i = 0; i < a.rgb.size(); ++i) {
    int diff = std::abs(int(a.rgb[i]) - int(b.rgb[i]));
    d.mean += diff;
    d.max = std::max(d.max, diff);
  }
  d.mean /= static_cast<double>(a.rgb.size());
  return d;
}

}  // namespace

// Lossless formats must decode exactly as PIL does (exif_transpose + convert("RGB")).
// Fixtures: tools/make_image_fixtures.py (regenerate with the reference environment).
class LosslessImage : public ::testing::TestWithParam<std::string> {};

TEST_P(LosslessImage, DecodesExactlyAsPIL) {
  Image decoded = read_image(images() / GetParam());
  Image expected = expected_for(GetParam());
  ASSERT_EQ(decoded.width, expected.width);
  ASSERT_EQ(decoded.height, expected.height);
  EXPECT_EQ(compare(decoded, expected).max, 0);
}

INSTANTIATE_TEST_SUITE_P(Formats, LosslessImage,
                         ::testing::Values("rgb8.png", "gray8.png", "palette.png", "rgba.png",
                                           "gray_alpha.png", "rgb16.png", "exif1.png", "exif2.png",
                                           "exif3.png", "exif4.png", "exif5.png", "exif6.png",
                                           "exif7.png", "exif8.png"));

// JPEG decoders differ in IDCT rounding and chroma upsampling (stb vs libjpeg), so pixels
// agree only approximately. Tolerance: mean |diff| <= 3 levels and max <= 48 on the 24x16
// test pattern; a wrong orientation or channel order gives a mean above 40.
class LossyImage : public ::testing::TestWithParam<std::string> {};

TEST_P(LossyImage, DecodesCloseToPILWithTheSameOrientation) {
  Image decoded = read_image(images() / GetParam());
  Image expected = expected_for(GetParam());
  ASSERT_EQ(decoded.width, expected.width);
  ASSERT_EQ(decoded.height, expected.height);
  Difference d = compare(decoded, expected);
  EXPECT_LE(d.mean, 3.0);
  EXPECT_LE(d.max, 48);
}

INSTANTIATE_TEST_SUITE_P(Formats, LossyImage,
                         ::testing::Values("baseline.jpg", "progressive.jpeg", "gray.jpg", "cmyk.jpg",
                                           "UPPER.JPG", "exif1.jpg", "exif2.jpg", "exif3.jpg",
                                           "exif4.jpg", "exif5.jpg", "exif6.jpg", "exif7.jpg",
                                           "exif8.jpg"));

TEST(ImageExif, ReadsEveryOrientationTag) {
  for (int orientation = 1; orientation <= 8; ++orientation) {
    for (const char* ext : {".jpg", ".png"}) {
      auto path = images() / ("exif" + std::to_string(orientation) + ext);
      EXPECT_EQ(exif_orientation(read_file(path)), orientation) << path;
    }
  }
  EXPECT_EQ(exif_orientation(read_file(images() / "baseline.jpg")), 1);
}

TEST(ImageExif, RotationsAreInverseOfEachOther) {
  Image image{3, 2, {}};
  for (int i = 0; i < 18; ++i) image.rgb.push_back(static_cast<uint8_t>(i));
  // 6 (rotate 90 clockwise) three more times gives orientation 8's result.
  Image r6 = apply_exif_orientation(image, 6);
  EXPECT_EQ(r6.width, 2);
  EXPECT_EQ(r6.height, 3);
  Image three = apply_exif_orientation(apply_exif_orientation(r6, 6), 6);
  EXPECT_EQ(three.rgb, apply_exif_orientation(image, 8).rgb);
  EXPECT_EQ(apply_exif_orientation(apply_exif_orientation(image, 3), 3).rgb, image.rgb);
}

class BrokenImage : public ::testing::TestWithParam<std::string> {};

TEST_P(BrokenImage, IsAnInputDataErrorNamingTheFile) {
  auto path = images() / GetParam();
  try {
    read_image(path);
    FAIL() << "expected an error for " << path;
  } catch (const InputDataError& e) {
    EXPECT_NE(std::string(e.what()).find(GetParam()), std::string::npos) << e.what();
    EXPECT_EQ(e.code(), ExitCode::input_data);
  }
}

INSTANTIATE_TEST_SUITE_P(Files, BrokenImage,
                         ::testing::Values("broken_truncated.jpg", "broken_empty.png",
                                           "broken_text.png", "broken_garbage.png"));

TEST(BrokenImage, AHugeImageIsRefusedBeforeDecodingWithAdviceThatFits) {
  // PNGs whose header claims 20000x20000 and 12000x12000 pixels (no pixel data needed).
  auto be32 = [](uint32_t v) {
    return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8),
                       static_cast<char>(v)};
  };
  for (const auto& [side, expected] : {std::pair<uint32_t, std::string>{20000, "huge.png: the image is too large to decode"},
                                        {12000, "huge.png: the image is 12000x12000 pixels"}}) {
    const std::string png = "\x89PNG\r\n\x1a\n" + be32(13) + "IHDR" + be32(side) + be32(side) +
                            std::string("\x08\x02\x00\x00\x00", 5) + be32(0);
    try {
      decode_image(png, "huge.png");
      FAIL() << "a " << side << "x" << side << " image was accepted";
    } catch (const InputDataError& e) {
      const std::string message = e.what();
      EXPECT_NE(message.find(expected), std::string::npos) << message;
      EXPECT_NE(message.find("scale it down"), std::string::npos) << message;
      EXPECT_EQ(message.find("re-save it as PNG"), std::string::npos) << message;
    }
  }
}

TEST(ImageFiles, ExtensionsAreCaseInsensitive) {
  EXPECT_TRUE(is_image_file("a.PNG"));
  EXPECT_TRUE(is_image_file("a.Jpeg"));
  EXPECT_TRUE(is_image_file("a.jpg"));
  EXPECT_FALSE(is_image_file("dataset_info.json"));
  EXPECT_FALSE(is_image_file("a.webp"));
}

TEST(ImageWrite, PngRoundTripsWithTextChunks) {
  auto dir = sdtrain::testing::scratch_dir();
  Image image = read_image(images() / "rgb8.png");
  write_png(dir / "out.png", image, {{"prompt", "a photo of sks cat"}, {"seed", "7"}});
  Image again = read_image(dir / "out.png");
  EXPECT_EQ(again.rgb, image.rgb);
  std::string bytes = read_file(dir / "out.png");
  EXPECT_NE(bytes.find(std::string("tEXtprompt\0a photo of sks cat", 29)), std::string::npos);
}
