"""Writes tests/fixtures/pipeline/ with diffusers' StableDiffusionPipeline on the bundled tiny model.

For each case of CASES: the pipeline from configs/demo/model (safety_checker=None), its scheduler
switched as users switch it (`X.from_config(pipe.scheduler.config)`), called with the case's
prompt, negative prompt, steps, guidance, size and generator(s) with output_type="np".
pipeline.safetensors holds each case's float images [N, H, W, 3] (before the uint8 rounding);
pipeline_cases.json the arguments, for the C++ test to replay.

    ~/.cache/sdtrain/venv/bin/python tools/make_pipeline_fixtures.py [tests/fixtures/pipeline]
"""
import argparse
import json
import sys
from pathlib import Path

import diffusers
import numpy
import safetensors
import torch
import transformers
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionPipeline)
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "configs/demo/model"

# seeds: one seed = one CPU generator for the whole call; a list = one generator per image.
CASES = {
    "pndm_negative": dict(scheduler="default", prompt="a photo of sks robot", negative_prompt="blurry, dark",
                          steps=10, guidance_scale=7.5, width=64, height=64, num_images=2, seeds=3),
    "euler_a": dict(scheduler="euler_a", prompt="a robot on a table", negative_prompt="", steps=10,
                    guidance_scale=5.0, width=64, height=48, num_images=1, seeds=1),
    "dpm_karras_no_guidance": dict(scheduler="dpm++2m_karras", prompt="a red robot", negative_prompt="",
                                   steps=8, guidance_scale=1.0, width=64, height=64, num_images=1, seeds=2),
    "ddim_per_image_generators": dict(scheduler="ddim", prompt="a photo of a robot", negative_prompt="",
                                      steps=6, guidance_scale=7.5, width=48, height=64, num_images=2,
                                      seeds=[5, 6]),
}


def switch_scheduler(pipe, name: str) -> None:
    config = pipe.scheduler.config
    if name == "default":
        return
    if name == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(config)
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    elif name == "euler_a":
        pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(config)
    elif name.startswith("dpm++2m"):
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=name.endswith("karras"))
    else:
        raise ValueError(name)


def run_case(case: dict) -> torch.Tensor:
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    switch_scheduler(pipe, case["scheduler"])
    seeds = case["seeds"]
    if isinstance(seeds, list):
        generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    else:
        generator = torch.Generator("cpu").manual_seed(seeds)
    images = pipe(case["prompt"], negative_prompt=case["negative_prompt"] or None,
                  num_inference_steps=case["steps"], guidance_scale=case["guidance_scale"],
                  width=case["width"], height=case["height"], num_images_per_prompt=case["num_images"],
                  generator=generator, output_type="np").images
    return torch.from_numpy(numpy.ascontiguousarray(images))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=REPO / "tests/fixtures/pipeline")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    tensors = {name: run_case(case) for name, case in CASES.items()}
    (args.out / "pipeline_cases.json").write_text(json.dumps(CASES, indent=2) + "\n")
    save_file(tensors, args.out / "pipeline.safetensors", metadata={
        "format": "pt", "generator": "tools/make_pipeline_fixtures.py", "model": "configs/demo/model",
        "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
        "safetensors": safetensors.__version__, "python": sys.version.split()[0]})
    for name, images in tensors.items():
        print(f"{name}: {tuple(images.shape)} mean {images.mean():.4f}")


if __name__ == "__main__":
    main()
