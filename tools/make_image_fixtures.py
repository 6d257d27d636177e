"""Writes the image-decoding fixtures: odd formats, EXIF orientations and broken files, each
with what PIL makes of it (exif_transpose + convert("RGB"), as diffusers' DreamBooth dataset
does) saved as a lossless 8-bit RGB PNG `<name>.expected.png`.

    python tools/make_image_fixtures.py tests/fixtures/images
"""
import io
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

W, H = 24, 16  # not square, so that a missed rotation changes the shape


def pattern() -> np.ndarray:
    """Smooth gradients (JPEG-friendly) plus a bright corner block that marks orientation."""
    y, x = np.mgrid[0:H, 0:W]
    rgb = np.stack([x * 255 // (W - 1), y * 255 // (H - 1), (x + y) * 255 // (W + H - 2)], -1)
    rgb[:5, :5] = [255, 255, 255]
    return rgb.astype(np.uint8)


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def save(out: Path, name: str, image: Image.Image, **kwargs):
    path = out / name
    image.save(path, **kwargs)
    expected = ImageOps.exif_transpose(Image.open(path))
    expected.convert("RGB").save(out / (path.stem + path.suffix.replace(".", "_") + ".expected.png"))


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    rgb = Image.fromarray(pattern(), "RGB")
    save(out, "rgb8.png", rgb)
    save(out, "gray8.png", rgb.convert("L"))
    save(out, "palette.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    rgba = rgb.copy()
    rgba.putalpha(Image.fromarray((pattern()[..., 0] // 2).astype(np.uint8), "L"))
    save(out, "rgba.png", rgba)
    save(out, "gray_alpha.png", rgba.convert("LA"))
    # 16-bit RGB: PIL keeps the high byte of each sample when it decodes to 8 bits.
    rgb16 = (pattern().astype(np.uint16) * 257 + np.arange(W, dtype=np.uint16)[None, :, None])
    # PIL cannot write 16-bit RGB PNGs, so this one is assembled from raw chunks.
    write_png16(out / "rgb16.png", rgb16)
    Image.open(out / "rgb16.png").convert("RGB").save(out / "rgb16_png.expected.png")
    save(out, "baseline.jpg", rgb, quality=95)
    save(out, "progressive.jpeg", rgb, quality=95, progressive=True)
    save(out, "gray.jpg", rgb.convert("L"), quality=95)
    save(out, "cmyk.jpg", rgb.convert("CMYK"), quality=95)
    save(out, "UPPER.JPG", rgb, quality=95)
    for orientation in range(1, 9):
        save(out, f"exif{orientation}.jpg", rgb, quality=95, exif=exif_with_orientation(orientation))
        save(out, f"exif{orientation}.png", rgb, exif=exif_with_orientation(orientation))
    # Broken files (no expected image): each must give a clear error naming the file.
    good = (out / "baseline.jpg").read_bytes()
    (out / "broken_truncated.jpg").write_bytes(good[: len(good) // 3])
    (out / "broken_empty.png").write_bytes(b"")
    (out / "broken_text.png").write_text("this is not an image\n")
    png = (out / "rgb8.png").read_bytes()
    (out / "broken_garbage.png").write_bytes(png[:40] + bytes(range(256)) * 2)


def write_png16(path: Path, rgb16: np.ndarray):
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in rgb16)
    ihdr = struct.pack(">IIBBBBB", W, H, 16, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))


if __name__ == "__main__":
    main()
