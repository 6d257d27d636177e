#!/usr/bin/env python3
"""Lean mode's trade-off on the bundled tiny model: the same run with fp32 master weights and with
bf16 weights rounded stochastically (weight_dtype bf16), and, for scale, with bf16 weights rounded
to nearest being what a plain bf16 cast would give (not a mode of sdtrain: it is measured as the
fp32 run's weights cast to bf16, the error the storage alone adds). Prints a Markdown table of
the loss curves (mean over windows of steps) and of how far each run's UNet weights moved from
the base and from the fp32 run's. CPU, bf16 autocast for both runs, so they differ only in the
weight storage.

    python3 tools/compare_lean_mode.py --sdtrain build/sdtrain [--steps 300] [--out /tmp/lean]
"""
import argparse
import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent
UNET = "unet/diffusion_pytorch_model.safetensors"


def train(args, name, extra):
    out = Path(args.out) / name
    command = [args.sdtrain, "train", "--overwrite", "--config", str(ROOT / "configs" / "demo.json"),
               "--set", f"output_dir={out}", "--set", f"max_steps={args.steps}",
               "--set", "mixed_precision=bf16", "--set", "optimizer=adamw8bit",
               "--set", "learning_rate=1e-4", "--set", "max_grad_norm=0",
               "--set", "checkpointing_steps=100000", "--set", "validation_prompts=[]",
               "--set", "device=cpu"] + [a for s in extra for a in ("--set", s)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    losses = [json.loads(line)["loss"] for line in open(out / "logs" / "metrics.jsonl")]
    return losses, load_file(out / UNET)


def relative(a, b):
    num = sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a)
    den = sum((b[k].float() ** 2).sum() for k in a)
    return float((num / den).sqrt())


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sdtrain", default=str(ROOT / "build" / "sdtrain"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="/tmp/sdtrain-lean")
    args = parser.parse_args()
    base = load_file(ROOT / "configs" / "demo" / "model" / UNET)
    fp32_losses, fp32 = train(args, "fp32", [])
    lean_losses, lean = train(args, "lean", ["weight_dtype=bf16"])
    cast = {k: v.to(torch.bfloat16).float() for k, v in fp32.items()}
    window = max(1, args.steps // 6)
    print(f"| steps | fp32 master weights: mean loss | lean (bf16, stochastic rounding): mean loss |")
    print("|---|---|---|")
    for start in range(0, args.steps, window):
        a = fp32_losses[start:start + window]
        b = lean_losses[start:start + window]
        print(f"| {start + 1}–{start + len(a)} | {sum(a) / len(a):.4f} | {sum(b) / len(b):.4f} |")
    print()
    print("| UNet weights | relative L2 |")
    print("|---|---|")
    print(f"| fp32 run moved from the base | {relative(fp32, base):.3e} |")
    print(f"| lean run moved from the base | {relative(lean, base):.3e} |")
    print(f"| lean run from the fp32 run | {relative(lean, fp32):.3e} |")
    print(f"| fp32 run cast to bf16, from the fp32 run (storage alone) | {relative(cast, fp32):.3e} |")


if __name__ == "__main__":
    main()
