"""Builds a random-weight Stable Diffusion folder at the real component sizes, for timing and memory.

The UNet, VAE and text encoder come from the real configs in tests/fixtures/configs/ (SD 2.1-base
by default: 866 M UNet parameters, OpenCLIP ViT-H text encoder, the 8x VAE) with random weights
from a fixed seed, saved as float32 safetensors; tokenizer/, scheduler/, feature_extractor/ and
model_index.json are copied from the bundled demo model (its tokenizer is a truncated CLIP BPE,
whose ids are valid for the full vocabulary). The result trains and samples like the real model
but draws noise: use it for speed and memory, never for images. Needs diffusers and
transformers (tools/requirements.txt).

    python tools/make_full_size_model.py /tmp/sd21-base-random
"""
import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "tests/fixtures/configs"
DEMO = REPO / "configs/demo/model"
FAMILIES = {
    "sd21-base": ("unet_sd21_base", "vae_sd21_base", "text_encoder_sd21"),
    "sd15": ("unet_sd15", "vae_sd15", "text_encoder_sd15"),
}


def load_config(name: str) -> dict:
    config = json.loads((CONFIGS / name / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd21-base")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unet_name, vae_name, text_name = FAMILIES[args.family]
    torch.manual_seed(args.seed)
    staging = args.out.with_name(args.out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    for folder in ("tokenizer", "scheduler", "feature_extractor"):
        shutil.copytree(DEMO / folder, staging / folder)
    shutil.copy(DEMO / "model_index.json", staging / "model_index.json")
    UNet2DConditionModel.from_config(load_config(unet_name)).save_pretrained(staging / "unet")
    AutoencoderKL.from_config(load_config(vae_name)).save_pretrained(staging / "vae")
    CLIPTextModel(CLIPTextConfig(**load_config(text_name))).save_pretrained(staging / "text_encoder")
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(f"wrote {args.out} ({args.family}, random weights, seed {args.seed})")


if __name__ == "__main__":
    main()
