#!/usr/bin/env python3
"""The project's sampling benchmark: images/s of `sdtrain generate` and of the trainer's
class-image generation, beside diffusers' StableDiffusionPipeline on the same model and GPU.

    python3 tools/benchmark_sampling.py --sdtrain build/sdtrain [--model /tmp/sd21] \
        [--batches 5] [--batch-size 4] [--steps 25] [--class-steps 50] [--out DIR] \
        [--write docs/benchmarks.md]

Rows (each side in its own process, so that neither holds the other's GPU memory):
  * generate: `sdtrain generate` of batches x batch-size images at --steps, guidance 7.5, the
    model's own scheduler (PNDM for SD 2.1-base); each batch's seconds come from its log line
    (`sampled images 1..4 of 20 (25 steps) in 0.812 s`), the median of batches after the first
    (cuDNN's autotuning and the allocator's first blocks). diffusers: the pipeline called once per
    batch with the same prompt, size, steps and guidance, output_type "pil", timed around the
    call, the same median.
  * class images: `sdtrain train` generating batches x batch-size class images at
    --class-steps into an empty folder (then one training step), its
    `class images: generated N in X s` line: loading excluded, the first batch and the PNG writes
    included. diffusers: what train_dreambooth.py does for them, timed the same way: the pipeline
    per batch of sample_batch_size prompts at its default 50 steps, each image saved as PNG.
Load seconds are reported apart: sdtrain's `loaded the base model … in X s` line; diffusers'
from_pretrained and .to(device).
The table goes to OUT/sampling.md and, with --write, between the sampling markers of that file.
For a smoke run on a CPU: --model configs/demo/model --device cpu --dtype fp32 --resolution 64.
"""
import argparse
import datetime
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- sampling:begin -->", "<!-- sampling:end -->"
PROMPT = "a photo of a robot"


def run(command, log, timeout=900):
    with open(log, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                              timeout=timeout).returncode


def median_after_first(seconds):
    kept = seconds[1:] if len(seconds) > 1 else seconds
    return statistics.median(kept) if kept else None


def sdtrain_generate(args, flags=(), name="generate"):
    log = Path(args.out) / f"sdtrain-{name}.log"
    code = run([args.sdtrain, "generate", "--model", args.model, "--prompt", PROMPT,
                "--num-images", str(args.batches * args.batch_size),
                "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                "--width", str(args.resolution), "--height", str(args.resolution),
                "--dtype", args.dtype, "--device", args.device,
                "--out", str(Path(args.out) / f"sdtrain-{name}")] + list(flags), log)
    text = log.read_text()
    batches = [float(s) for s in re.findall(r"sampled images \S+ of \d+ \(\d+ steps\) in ([0-9.]+) s",
                                             text)]
    loaded = re.search(r"loaded the base model .* in ([0-9.]+) s", text)
    median = median_after_first(batches)
    return {"rc": code, "batch_seconds": batches, "load": float(loaded.group(1)) if loaded else None,
            "images_per_second": args.batch_size / median if code == 0 and median else None}


def sdtrain_class_images(args):
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import sdtrain_settings  # the step benchmark's settings, then ours over them
    out = Path(args.out)
    class_dir = out / "sdtrain-class-images"
    if class_dir.exists():
        for image in class_dir.iterdir():
            image.unlink()
    config = out / "base.json"
    config.write_text("{}\n")
    settings = argparse.Namespace(resolution=args.resolution, steps=1,
                                  mixed_precision="no" if args.dtype == "fp32" else args.dtype,
                                  device=args.device)
    overrides = [f"class_data_dir={class_dir}",
                 f"num_class_images={args.batches * args.batch_size}",
                 f"sample_batch_size={args.batch_size}", f"prior_generation_steps={args.class_steps}",
                 f"prior_generation_precision={args.dtype}"]
    common = sdtrain_settings(settings, Path(args.model), ROOT / "configs" / "demo" / "instance",
                              out / "sdtrain-class-run", overrides)
    log = out / "sdtrain-class-images.log"
    code = run([args.sdtrain, "train", "--overwrite", "--config", str(config)] + common, log)
    found = re.search(r"class images: generated (\d+) in ([0-9.]+) s", log.read_text())
    if not found:
        return {"rc": code}
    return {"rc": code, "images": int(found.group(1)), "seconds": float(found.group(2)),
            "images_per_second": int(found.group(1)) / float(found.group(2))}


def diffusers_side(args, what):
    """Runs this file again as the diffusers worker; its last line is the JSON result."""
    log = Path(args.out) / f"diffusers-{what}.log"
    command = [sys.executable, __file__, "--diffusers-worker", what, "--model", args.model,
               "--batches", str(args.batches), "--batch-size", str(args.batch_size),
               "--steps", str(args.steps), "--class-steps", str(args.class_steps),
               "--resolution", str(args.resolution), "--device", args.device, "--dtype", args.dtype,
               "--out", args.out]
    code = run(command, log)
    lines = [line for line in log.read_text().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if code == 0 and lines else {"rc": code}


def diffusers_worker(args):
    import torch
    from diffusers import StableDiffusionPipeline
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    started = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(args.model, torch_dtype=dtype, safety_checker=None,
                                                   feature_extractor=None,
                                                   requires_safety_checker=False).to(args.device)
    load = time.perf_counter() - started
    pipe.set_progress_bar_config(disable=True)
    class_images = args.diffusers_worker == "class-images"
    steps = args.class_steps if class_images else args.steps
    folder = Path(args.out) / f"diffusers-{args.diffusers_worker}"
    folder.mkdir(parents=True, exist_ok=True)
    seconds = []
    for batch in range(args.batches):
        begin = time.perf_counter()
        images = pipe([PROMPT] * args.batch_size, num_inference_steps=steps, guidance_scale=7.5,
                      height=args.resolution, width=args.resolution,
                      generator=torch.Generator("cpu").manual_seed(batch)).images
        if class_images:  # train_dreambooth.py saves each class image as it comes
            for i, image in enumerate(images):
                image.save(folder / f"{batch}-{i}.png")
        seconds.append(time.perf_counter() - begin)
    if class_images:
        total = sum(seconds)
        result = {"images": len(seconds) * args.batch_size, "seconds": total,
                  "images_per_second": len(seconds) * args.batch_size / total}
    else:
        result = {"batch_seconds": seconds,
                  "images_per_second": args.batch_size / median_after_first(seconds)}
    result["load"] = load
    print(json.dumps(result), flush=True)


def machine():
    sys.path.insert(0, str(ROOT / "tools"))
    from benchmark import machine as step_benchmark_machine
    return step_benchmark_machine()


def cell(result, key):
    value = None if result is None else result.get(key)
    if value is None:
        return f"failed (rc {result.get('rc')})" if result and key == "images_per_second" else "—"
    return f"{value:.3g}"


# The rows: generate as the trainer's defaults run it; generate with the two compute options
# (docs/performance.md) that are off until measured, against the same diffusers run; class
# images.
FUSED_CL = "generate, fused + channels-last"


def row_steps(args):
    return (("generate", args.steps), (FUSED_CL, args.steps), ("class images", args.class_steps))


def table(results, args):
    lines = [BEGIN, "", f"- **Machine:** {machine()}",
             f"- **Date:** {datetime.date.today().isoformat()}",
             f"- **Command:** `python3 tools/benchmark_sampling.py --batches {args.batches} "
             f"--batch-size {args.batch_size} --steps {args.steps} --class-steps {args.class_steps}`",
             f"- **Run:** {Path(args.model).name} (random weights), {args.resolution}², {args.dtype}, "
             f"{args.device}, guidance 7.5, the model's own scheduler, {args.batch_size} prompt(s) per "
             "batch (twice that through the UNet with guidance).",
             "- **generate:** the median batch after the first; **class images:** every batch, the "
             "PNG writes included. Load: reading the model and moving it to the device.", "",
             "| row | steps | sdtrain images/s | diffusers images/s | sdtrain ÷ diffusers "
             "| sdtrain load s | diffusers load s |", "|---|---|---|---|---|---|---|"]
    for name, steps in row_steps(args):
        if name not in results:  # not run yet
            continue
        ours, theirs = results[name]
        ratio = "—"
        if ours.get("images_per_second") and theirs.get("images_per_second"):
            ratio = f"{ours['images_per_second'] / theirs['images_per_second']:.2f}×"
        lines.append(f"| {name} | {steps} | {cell(ours, 'images_per_second')} "
                     f"| {cell(theirs, 'images_per_second')} | {ratio} | {cell(ours, 'load')} "
                     f"| {cell(theirs, 'load')} |")
    return "\n".join(lines + ["", END])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdtrain", default=str(ROOT / "build" / "sdtrain"))
    parser.add_argument("--model", default="/tmp/sd21")
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--class-steps", type=int, default=50)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16")
    parser.add_argument("--out", default="/tmp/sdtrain-sampling")
    parser.add_argument("--write", help="a Markdown file to put the table in (docs/benchmarks.md)")
    parser.add_argument("--diffusers-worker", choices=["generate", "class-images"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.diffusers_worker:
        diffusers_worker(args)
        return
    if not (Path(args.model) / "model_index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_full_size_model.py"), args.model],
                       check=True)
    theirs_generate = diffusers_side(args, "generate")
    rows = [("generate", lambda: (sdtrain_generate(args), theirs_generate)),
            (FUSED_CL, lambda: (sdtrain_generate(args, ["--fused-group-norm-silu", "--channels-last"],
                                                 "generate-fused-cl"), theirs_generate)),
            ("class images", lambda: (sdtrain_class_images(args),
                                      diffusers_side(args, "class-images")))]
    results = {}
    for name, measure in rows:
        results[name] = measure()
        print(name, json.dumps(results[name][0]), json.dumps(results[name][1]), flush=True)
        # After every row, so that a time-out keeps the table of the rows that ran.
        text = table(results, args)
        (Path(args.out) / "sampling.md").write_text(text + "\n")
        (Path(args.out) / "sampling.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        sys.path.insert(0, str(ROOT / "tools"))
        from benchmark import write_into
        write_into(Path(args.write), text, BEGIN, END,
                   "## Sampling against diffusers' pipeline (issue 16): the benchmark program")
    print(text)


if __name__ == "__main__":
    main()
