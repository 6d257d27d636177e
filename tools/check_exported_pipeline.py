#!/usr/bin/env python3
"""Loads an sdtrain output folder with diffusers' StableDiffusionPipeline.from_pretrained, the way
users will, and reports (JSON on stdout) every warning diffusers/transformers logged while
loading (missing, unexpected or newly initialised weights show up there) and, when given an image
that `sdtrain generate` wrote from the same folder, the largest pixel difference from the image
diffusers generates with the same prompt, seed, steps and guidance (the folder's own scheduler).
With --lora, the LoRA file is loaded onto the pipeline with load_lora_weights first (warnings of
that load are reported too, Python warnings included) and the image is made at --lora-scale.
Used by tests/train/demo_test.cpp and tests/cli/lora_cli_test.cpp; the assertions live there.
"""
import argparse
import json
import logging

import numpy as np
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(f"{record.name}: {record.getMessage()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a pipeline folder")
    parser.add_argument("--unet", help="a UNet component folder alone (e.g. checkpoint-N/unet)")
    parser.add_argument("--image")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--lora", help="a LoRA file to load with load_lora_weights")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    args = parser.parse_args()

    collect = Collect()
    logging.captureWarnings(True)
    for name in ("diffusers", "transformers", "peft", "py.warnings"):
        logger = logging.getLogger(name)
        logger.addHandler(collect)
        logger.setLevel(logging.WARNING)
    if args.unet:
        unet = UNet2DConditionModel.from_pretrained(args.unet)
        print(json.dumps({"warnings": collect.messages, "parameters": sum(p.numel() for p in unet.parameters())}))
        return
    pipe = StableDiffusionPipeline.from_pretrained(args.model, safety_checker=None, requires_safety_checker=False)
    extra = {}
    if args.lora:
        pipe.load_lora_weights(args.lora)
        extra["cross_attention_kwargs"] = {"scale": args.lora_scale}
    report = {"warnings": collect.messages, "scheduler": type(pipe.scheduler).__name__}
    dtypes = {name: str(next(getattr(pipe, name).parameters()).dtype) for name in ("unet", "vae", "text_encoder")}
    report["dtypes"] = dtypes
    if args.image:
        ours = np.asarray(Image.open(args.image).convert("RGB")).astype(np.int32)
        generator = torch.Generator("cpu").manual_seed(args.seed)
        theirs = pipe(args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                      height=ours.shape[0], width=ours.shape[1], generator=generator, output_type="np",
                      **extra).images[0]
        theirs = (theirs * 255).round().astype(np.int32)
        diff = np.abs(ours - theirs)
        report["max_pixel_diff"] = int(diff.max())
        report["fraction_pixels_differing"] = float((diff > 0).mean())
    print(json.dumps(report))


if __name__ == "__main__":
    main()
