"""Draws the bundled demo's subject photos: a small orange toy robot on different backgrounds.

The pictures are generated here (no photograph is involved), so they carry the project's own
licence. One is stored rotated with an EXIF orientation tag, as phone photos often are, so the
demo exercises EXIF handling.

    python tools/make_demo_images.py configs/demo/instance
"""
import json
import sys
from pathlib import Path

from PIL import Image, ImageDraw

BACKGROUNDS = [(70, 130, 180), (60, 140, 90), (200, 190, 170), (120, 90, 160)]


def robot(size, background, offset, scale):
    image = Image.new("RGB", size, background)
    d = ImageDraw.Draw(image)
    cx, cy = size[0] // 2 + offset[0], size[1] // 2 + offset[1]
    s = scale
    d.rectangle([0, int(size[1] * 0.75), size[0], size[1]], fill=tuple(c // 2 for c in background))
    d.rectangle([cx - 14 * s, cy - 6 * s, cx + 14 * s, cy + 22 * s], fill=(235, 120, 30))   # body
    d.rectangle([cx - 10 * s, cy - 26 * s, cx + 10 * s, cy - 8 * s], fill=(245, 150, 50))  # head
    d.ellipse([cx - 7 * s, cy - 21 * s, cx - 2 * s, cy - 16 * s], fill=(20, 20, 20))       # eyes
    d.ellipse([cx + 2 * s, cy - 21 * s, cx + 7 * s, cy - 16 * s], fill=(20, 20, 20))
    d.line([cx, cy - 26 * s, cx, cy - 33 * s], fill=(60, 60, 60), width=max(1, s))         # antenna
    d.ellipse([cx - 2 * s, cy - 36 * s, cx + 2 * s, cy - 32 * s], fill=(230, 40, 40))
    d.rectangle([cx - 20 * s, cy - 2 * s, cx - 15 * s, cy + 14 * s], fill=(200, 100, 20))  # arms
    d.rectangle([cx + 15 * s, cy - 2 * s, cx + 20 * s, cy + 14 * s], fill=(200, 100, 20))
    return image


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    shots = [((96, 96), (0, 4), 2), ((112, 88), (-10, 6), 2), ((88, 112), (6, 10), 2), ((128, 96), (20, 8), 2)]
    for i, ((size, offset, scale), background) in enumerate(zip(shots, BACKGROUNDS)):
        image = robot(size, background, offset, scale)
        if i == 3:
            # Store the pixels rotated and let the EXIF tag (6: rotate 90 clockwise) undo it.
            exif = Image.Exif()
            exif[0x0112] = 6
            image.transpose(Image.Transpose.ROTATE_90).save(out / f"robot{i}.jpg", quality=92, exif=exif.tobytes())
        else:
            image.save(out / f"robot{i}.png" if i % 2 == 0 else out / f"robot{i}.jpg", **({} if i % 2 == 0 else {"quality": 92}))
    (out / "dataset_info.json").write_text(json.dumps(
        {"instance_prompt": "a photo of sks robot", "class_prompt": "a photo of a robot"}, indent=2) + "\n")


if __name__ == "__main__":
    main()
