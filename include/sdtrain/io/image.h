#pragma once
// Instance and class photos: decoded with stb_image to 8-bit RGB, with the EXIF orientation
// applied (phone photos store pixels sideways plus an orientation tag; diffusers' DreamBooth
// dataset applies PIL's exif_transpose, and training on unrotated photos was a long-standing
// complaint). Alpha is dropped as PIL's convert("RGB") does; 16-bit samples keep their high
// byte, as PIL does when it reduces them to 8 bits.

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace sdtrain::io {

struct Image {
  int width = 0;
  int height = 0;
  std::vector<uint8_t> rgb;  // [height, width, 3], row-major

  const uint8_t* pixel(int x, int y) const { return &rgb[(static_cast<std::size_t>(y) * width + x) * 3]; }
  uint8_t* pixel(int x, int y) { return &rgb[(static_cast<std::size_t>(y) * width + x) * 3]; }
};

// png, jpg, jpeg in any letter case.
bool is_image_file(const std::filesystem::path& path);

// Decodes a file and applies its EXIF orientation. Throws InputDataError naming the file and
// the decoder's reason when it cannot be read.
Image read_image(const std::filesystem::path& path);
Image decode_image(std::string_view bytes, const std::string& source);

// The EXIF orientation (1..8) stored in a JPEG APP1 segment or a PNG eXIf chunk; 1 when there
// is none or it is malformed (a bad tag never makes a photo unreadable).
int exif_orientation(std::string_view file_bytes);

// Transforms pixels stored with `orientation` to upright, as PIL's ImageOps.exif_transpose.
Image apply_exif_orientation(const Image& image, int orientation);

// Writes an 8-bit RGB PNG atomically, with optional tEXt chunks (keyword, text), which is how
// generated images carry their generation parameters.
void write_png(const std::filesystem::path& path, const Image& image,
               const std::vector<std::pair<std::string, std::string>>& text = {});

// The images side by side, `columns` per row (diffusers' make_image_grid), for `generate
// --grid` and the trainer's validation grids; all must have the first image's size.
Image make_image_grid(const std::vector<Image>& images, int columns);

}  // namespace sdtrain::io
