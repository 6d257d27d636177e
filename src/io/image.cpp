#include "sdtrain/io/image.h"

#include <stb_image.h>
#include <stb_image_write.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <memory>

#include "sdtrain/util/atomic_file.h"
#include "sdtrain/util/error.h"

namespace sdtrain::io {
namespace {

uint32_t read_u32_be(const unsigned char* p) {
  return (uint32_t{p[0]} << 24) | (uint32_t{p[1]} << 16) | (uint32_t{p[2]} << 8) | p[3];
}

// Orientation (tag 0x0112) from a TIFF structure, as EXIF stores it; 1 if absent/malformed.
int orientation_from_tiff(std::string_view tiff) {
  if (tiff.size() < 8) return 1;
  const auto* p = reinterpret_cast<const unsigned char*>(tiff.data());
  bool little = p[0] == 'I' && p[1] == 'I';
  bool big = p[0] == 'M' && p[1] == 'M';
  if (!little && !big) return 1;
  auto u16 = [&](std::size_t at) -> uint32_t {
    return little ? (p[at] | (p[at + 1] << 8)) : ((p[at] << 8) | p[at + 1]);
  };
  auto u32 = [&](std::size_t at) -> uint32_t {
    return little ? (u16(at) | (u16(at + 2) << 16)) : ((u16(at) << 16) | u16(at + 2));
  };
  if (u16(2) != 42) return 1;
  std::size_t ifd = u32(4);
  if (ifd + 2 > tiff.size()) return 1;
  std::size_t count = u16(ifd);
  for (std::size_t i = 0; i < count; ++i) {
    std::size_t entry = ifd + 2 + 12 * i;
    if (entry + 12 > tiff.size()) return 1;
    if (u16(entry) == 0x0112 && u16(entry + 2) == 3 /* SHORT */) {
      uint32_t value = u16(entry + 8);
      return value >= 1 && value <= 8 ? static_cast<int>(value) : 1;
    }
  }
  return 1;
}

int jpeg_orientation(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::size_t at = 2;  // after SOI
  while (at + 4 <= bytes.size()) {
    if (p[at] != 0xFF) return 1;
    unsigned marker = p[at + 1];
    if (marker == 0xD8 || (marker >= 0xD0 && marker <= 0xD7) || marker == 0x01 || marker == 0xFF) {
      at += marker == 0xFF ? 1 : 2;  // standalone markers and fill bytes
      continue;
    }
    if (marker == 0xDA || marker == 0xD9) return 1;  // image data starts: no EXIF before it
    std::size_t length = (p[at + 2] << 8) | p[at + 3];
    if (length < 2 || at + 2 + length > bytes.size()) return 1;
    std::string_view segment = bytes.substr(at + 4, length - 2);
    if (marker == 0xE1 && segment.size() > 6 && segment.substr(0, 6) == std::string_view("Exif\0\0", 6)) {
      return orientation_from_tiff(segment.substr(6));
    }
    at += 2 + length;
  }
  return 1;
}

int png_orientation(std::string_view bytes) {
  const auto* p = reinterpret_cast<const unsigned char*>(bytes.data());
  std::size_t at = 8;  // after the signature
  while (at + 12 <= bytes.size()) {
    uint32_t length = read_u32_be(p + at);
    std::string_view type = bytes.substr(at + 4, 4);
    if (length > bytes.size() - at - 12) return 1;
    if (type == "eXIf") return orientation_from_tiff(bytes.substr(at + 8, length));
    if (type == "IDAT" || type == "IEND") return 1;  // PIL reads eXIf before image data only
    at += 12 + length;
  }
  return 1;
}

void append_to_string(void* context, void* data, int size) {
  static_cast<std::string*>(context)->append(static_cast<const char*>(data), static_cast<std::size_t>(size));
}

// CRC-32 of PNG chunks (ISO 3309), needed to add tEXt chunks to stb's output.
uint32_t png_crc(std::string_view kind, std::string_view data) {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t n = 0; n < 256; ++n) {
      uint32_t c = n;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[n] = c;
    }
    return t;
  }();
  uint32_t crc = 0xFFFFFFFFu;
  for (std::string_view part : {kind, data}) {
    for (unsigned char byte : part) crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8);
  }
  return crc ^ 0xFFFFFFFFu;
}

std::string png_chunk(std::string_view kind, std::string_view data) {
  std::string chunk;
  auto put_u32 = [&](uint32_t v) {
    for (int shift = 24; shift >= 0; shift -= 8) chunk.push_back(static_cast<char>((v >> shift) & 0xFF));
  };
  put_u32(static_cast<uint32_t>(data.size()));
  chunk.append(kind);
  chunk.append(data);
  put_u32(png_crc(kind, data));
  return chunk;
}

}  // namespace

bool is_image_file(const std::filesystem::path& path) {
  std::string extension = path.extension().string();
  std::transform(extension.begin(), extension.end(), extension.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return extension == ".png" || extension == ".jpg" || extension == ".jpeg";
}

int exif_orientation(std::string_view bytes) {
  if (bytes.size() >= 2 && static_cast<unsigned char>(bytes[0]) == 0xFF &&
      static_cast<unsigned char>(bytes[1]) == 0xD8) {
    return jpeg_orientation(bytes);
  }
  if (bytes.size() >= 8 && bytes.substr(0, 8) == std::string_view("\x89PNG\r\n\x1a\n", 8)) {
    return png_orientation(bytes);
  }
  return 1;
}

Image apply_exif_orientation(const Image& image, int orientation) {
  if (orientation <= 1 || orientation > 8) return image;
  const int w = image.width, h = image.height;
  const bool swaps_axes = orientation >= 5;
  Image out;
  out.width = swaps_axes ? h : w;
  out.height = swaps_axes ? w : h;
  out.rgb.resize(image.rgb.size());
  for (int y = 0; y < out.height; ++y) {
    for (int x = 0; x < out.width; ++x) {
      int sx = x, sy = y;  // source pixel, per PIL's transpose for each orientation
      switch (orientation) {
        case 2: sx = w - 1 - x; break;                      // mirror left-right
        case 3: sx = w - 1 - x; sy = h - 1 - y; break;      // rotate 180
        case 4: sy = h - 1 - y; break;                      // mirror top-bottom
        case 5: sx = y; sy = x; break;                      // transpose
        case 6: sx = y; sy = h - 1 - x; break;              // rotate 90 clockwise
        case 7: sx = w - 1 - y; sy = h - 1 - x; break;      // transverse
        case 8: sx = w - 1 - y; sy = x; break;              // rotate 90 counter-clockwise
      }
      std::copy_n(image.pixel(sx, sy), 3, out.pixel(x, y));
    }
  }
  return out;
}

// 100 megapixels: 300 MB decoded, far above any camera photo a DreamBooth set uses.
constexpr int64_t kMaxImagePixels = 100'000'000;

Image decode_image(std::string_view bytes, const std::string& source) {
  if (bytes.empty()) throw InputDataError(source + ": the file is empty; remove it or replace it with a PNG/JPEG photo");
  int width = 0, height = 0, channels = 0;
  // A decoder's "too large" says nothing of what to do; the size itself does.
  if (stbi_info_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()), static_cast<int>(bytes.size()), &width,
                            &height, &channels) &&
      static_cast<int64_t>(width) * height > kMaxImagePixels) {
    throw InputDataError(source + ": the image is " + std::to_string(width) + "x" + std::to_string(height) +
                         " pixels, more than the " + std::to_string(kMaxImagePixels / 1000000) +
                         " megapixels sdtrain reads; scale it down (training crops to resolution, at most 4096)");
  }
  // Ask for 3 channels: stb expands gray/palette and drops alpha, and reduces 16-bit PNG
  // samples to their high byte.
  std::unique_ptr<stbi_uc, void (*)(void*)> pixels(
      stbi_load_from_memory(reinterpret_cast<const stbi_uc*>(bytes.data()), static_cast<int>(bytes.size()),
                            &width, &height, &channels, 3),
      stbi_image_free);
  if (!pixels) {
    const std::string reason = stbi_failure_reason();
    if (reason == "too large") {  // stb refuses images over 1 GiB of pixels before decoding
      throw InputDataError(source + ": the image is too large to decode (over 1 GiB of pixels); scale it down "
                           "(training crops to resolution, at most 4096)");
    }
    throw InputDataError(source + ": cannot decode image (" + reason + "); re-save it as PNG or baseline JPEG, or remove it");
  }
  Image image;
  image.width = width;
  image.height = height;
  image.rgb.assign(pixels.get(), pixels.get() + static_cast<std::size_t>(width) * height * 3);
  return apply_exif_orientation(image, exif_orientation(bytes));
}

Image read_image(const std::filesystem::path& path) {
  if (std::filesystem::file_size(path) > (1ull << 30)) {
    throw InputDataError(path.string() + ": larger than 1 GiB; this is not a photo sdtrain can use");
  }
  return decode_image(read_file(path, ExitCode::input_data), path.string());
}

void write_png(const std::filesystem::path& path, const Image& image,
               const std::vector<std::pair<std::string, std::string>>& text) {
  std::string encoded;
  if (!stbi_write_png_to_func(append_to_string, &encoded, image.width, image.height, 3, image.rgb.data(),
                              image.width * 3)) {
    throw OutputError("cannot encode PNG for " + path.string());
  }
  std::string_view bytes = encoded;
  // tEXt chunks go right after IHDR (8-byte signature + 25-byte IHDR chunk).
  constexpr std::size_t kAfterHeader = 8 + 25;
  AtomicFile file(path);
  file.write(bytes.substr(0, kAfterHeader));
  for (const auto& [keyword, value] : text) file.write(png_chunk("tEXt", keyword + '\0' + value));
  file.write(bytes.substr(kAfterHeader));
  file.commit();
}

Image make_image_grid(const std::vector<Image>& images, int columns) {
  if (images.empty()) return {};
  const int rows = static_cast<int>((images.size() + columns - 1) / columns);
  const int w = images[0].width, h = images[0].height;
  for (const auto& image : images) {
    if (image.width != w || image.height != h) throw std::invalid_argument("make_image_grid: images differ in size");
  }
  Image grid;
  grid.width = w * columns;
  grid.height = h * rows;
  grid.rgb.assign(static_cast<std::size_t>(grid.width) * grid.height * 3, 0);
  for (std::size_t i = 0; i < images.size(); ++i) {
    const int x0 = static_cast<int>(i % columns) * w, y0 = static_cast<int>(i / columns) * h;
    for (int y = 0; y < h; ++y) std::copy_n(images[i].pixel(0, y), w * 3, grid.pixel(x0, y0 + y));
  }
  return grid;
}

}  // namespace sdtrain::io
