"""Writes tests/fixtures/dataset/preprocess.safetensors: what diffusers' DreamBoothDataset makes
of a few photos, for sdtrain's image preprocessing tests.

The dataset opens each photo with PIL (exif_transpose, convert("RGB")) and applies torchvision's
Resize(resolution, BILINEAR), CenterCrop or RandomCrop(resolution), ToTensor and
Normalize([0.5], [0.5]). torchvision is not part of the reference environment, so this script
applies the same documented rules itself on PIL images:
  - Resize with an int: the shorter side becomes `resolution`, the longer one
    int(resolution * long / short) (truncated), resampled by PIL's Image.resize(BILINEAR);
  - CenterCrop: top = int(round((height - size) / 2.0)), left likewise (Python's round: half to even);
  - ToTensor + Normalize: float32 (pixel / 255 - 0.5) / 0.5, channels first.

Tensors (names use the photo's file name without extension):
  source.<photo>                    uint8 [H, W, 3]   PIL's decoded pixels, JPEG photos only (libjpeg
                                                      and stb_image decode JPEGs slightly differently;
                                                      the resize is compared on the same input)
  resized.<photo>.<resolution>      uint8 [H, W, 3]   PIL's bilinear resize
  center_crop.<photo>.<resolution>  uint8 [R, R, 3]   center crop of the above
  normalized.<photo>.<resolution>   float32 [3, R, R] that crop as the model's input
  center_offsets                    int64 [21]        the crop offset for (extent - size) = 0..20
The generator's versions are in the file's __metadata__.

    ~/.cache/sdtrain/venv/bin/python tools/make_dataset_fixtures.py [tests/fixtures/dataset]
"""
import sys
from pathlib import Path

import numpy
import PIL
import safetensors
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent

# (photo, resolutions): downscaling (several ratios, odd crop margins) and upscaling (104 > 96,
# 40 > 16) for each orientation; robot3.jpg carries an EXIF orientation tag.
CASES = [
    ("configs/demo/instance/robot0.png", (40, 64, 104)),
    ("configs/demo/instance/robot1.jpg", (40, 64, 72)),
    ("configs/demo/instance/robot2.png", (40, 72)),
    ("configs/demo/instance/robot3.jpg", (40, 72)),
    ("tests/fixtures/images/rgb8.png", (8, 40)),
]
# Crop margins 17 (8.5 rounds to 8), 19 (9.5 rounds to 10), 24 and 20.
CENTER_CROPS = [("robot1", 64), ("robot1", 72), ("robot3", 72), ("rgb8", 40)]
NORMALIZED = ("rgb8", 40)


def open_rgb(path: Path) -> Image.Image:
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def resized_size(width: int, height: int, resolution: int) -> tuple:
    short, long = min(width, height), max(width, height)
    new_long = int(resolution * long / short)
    return (resolution, new_long) if width <= height else (new_long, resolution)


def center_offset(extent: int, size: int) -> int:
    return int(round((extent - size) / 2.0))


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    top = center_offset(image.height, size)
    left = center_offset(image.width, size)
    return torch.from_numpy(numpy.asarray(image)[top:top + size, left:left + size].copy())


def normalized(crop: torch.Tensor) -> torch.Tensor:
    return crop.permute(2, 0, 1).float().div(255).sub(0.5).div(0.5).contiguous()


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests/fixtures/dataset"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    resized = {}
    for relative, resolutions in CASES:
        path = REPO / relative
        image = open_rgb(path)
        if path.suffix.lower() in (".jpg", ".jpeg"):
            tensors[f"source.{path.stem}"] = torch.from_numpy(numpy.asarray(image).copy())
        for resolution in resolutions:
            small = image.resize(resized_size(image.width, image.height, resolution), Image.BILINEAR)
            resized[(path.stem, resolution)] = small
            tensors[f"resized.{path.stem}.{resolution}"] = torch.from_numpy(numpy.asarray(small).copy())
    for stem, resolution in CENTER_CROPS:
        tensors[f"center_crop.{stem}.{resolution}"] = center_crop(resized[(stem, resolution)], resolution)
    stem, resolution = NORMALIZED
    tensors[f"normalized.{stem}.{resolution}"] = normalized(tensors[f"center_crop.{stem}.{resolution}"])
    tensors["center_offsets"] = torch.tensor([center_offset(d, 0) for d in range(21)], dtype=torch.int64)
    metadata = {"format": "pt", "generator": "tools/make_dataset_fixtures.py", "torch": torch.__version__,
                "pillow": PIL.__version__, "numpy": numpy.__version__, "safetensors": safetensors.__version__,
                "python": sys.version.split()[0]}
    save_file(tensors, out / "preprocess.safetensors", metadata=metadata)
    print(f"wrote {len(tensors)} tensors to {out / 'preprocess.safetensors'}")


if __name__ == "__main__":
    main()
