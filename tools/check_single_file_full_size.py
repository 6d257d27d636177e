#!/usr/bin/env python3
"""The single-file checks of docs/single_file.md at the real SD 1.5 and SD 2.1-base sizes (random
weights; a tool run, not CI: about 20 GB of disk and 15 minutes per model on 2 cores).

For a diffusers folder F (tools/make_full_size_model.py) and a work folder W:
  1. ours:       `sdtrain convert --model F --out W/ours.safetensors`, read by diffusers'
                 StableDiffusionPipeline.from_single_file(config=F), equals F tensor for tensor;
  2. round trip: `sdtrain convert --model W/ours.safetensors --out W/ours-back` (configs built
                 from the file, no single_file_config) holds F's tensors bit for bit;
  3. theirs:     diffusers' own scripts/convert_diffusers_to_original_stable_diffusion.py writes
                 W/theirs.safetensors from F; `sdtrain convert` reads it back into W/theirs-back,
                 which equals diffusers' from_single_file(W/theirs.safetensors, config=F).
Prints one JSON object per check; exits 1 when any differs.

    python tools/check_single_file_full_size.py --folder /tmp/fs/sd21-base --work /tmp/fs/w21 \
        --sdtrain build/sdtrain --convert-script convert_diffusers_to_original_stable_diffusion.py
"""
import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

FILES = {"unet": "unet/diffusion_pytorch_model.safetensors",
         "vae": "vae/diffusion_pytorch_model.safetensors",
         "text_encoder": "text_encoder/model.safetensors"}


def without_prefix(tensors):
    """transformers 5 saves CLIPTextModel without the "text_model." prefix, sdtrain with it
    (state_dict() names); both load the same module."""
    return {k.removeprefix("text_model."): v for k, v in tensors.items()}


def folder_tensors(folder: Path):
    return {name: without_prefix(load_file(str(folder / path))) for name, path in FILES.items()}


def from_single_file(file: Path, config: Path):
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_single_file(str(file), config=str(config), local_files_only=True,
                                                    safety_checker=None, requires_safety_checker=False)
    return {name: without_prefix({k: v.detach() for k, v in getattr(pipe, name).state_dict().items()})
            for name in FILES}


def compare(check: str, got, want):
    report = {"check": check, "components": {}, "equal": True}
    for name in FILES:
        a, b = got[name], {k: v for k, v in want[name].items() if not k.endswith("position_ids")}
        a = {k: v for k, v in a.items() if not k.endswith("position_ids")}
        shared = sorted(set(a) & set(b))
        different = [k for k in shared if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
        report["components"][name] = {"compared": len(shared), "different": different[:5],
                                      "only_got": sorted(set(a) - set(b))[:5],
                                      "only_want": sorted(set(b) - set(a))[:5]}
        report["equal"] &= not different and set(a) == set(b)
    print(json.dumps(report), flush=True)
    return report["equal"]


def hub_layout(folder: Path, out: Path) -> Path:
    """F with its text encoder's keys as the Hub's SD folders hold them ("text_model." prefix,
    transformers 4): diffusers' conversion script tells SD 2 from SD 1 by
    "text_model.encoder.layers.22..." and, given transformers 5's unprefixed keys, writes an SD 2
    text encoder in a layout no loader reads (docs/single_file.md)."""
    from safetensors.torch import save_file
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for entry in folder.iterdir():
        if entry.name != "text_encoder":
            (out / entry.name).symlink_to(entry.resolve())
    (out / "text_encoder").mkdir()
    shutil.copy(folder / "text_encoder" / "config.json", out / "text_encoder" / "config.json")
    tensors = load_file(str(folder / FILES["text_encoder"]))
    save_file({k if k.startswith("text_model.") else "text_model." + k: v for k, v in tensors.items()},
              str(out / FILES["text_encoder"]))
    return out


def compare_configs(check: str, got: Path, want: Path):
    """Every config key of F that a model reads, in the folder sdtrain wrote: the configs it built
    from the file's shapes. Reported, not judged: the Hub's SD 2.1-base VAE says sample_size 768,
    and old transformers configs carry bos/eos ids 0/2 (docs/single_file.md)."""
    report = {"check": check}
    for name in FILES:
        a = json.loads((want / name / "config.json").read_text())
        b = json.loads((got / name / "config.json").read_text())
        report[name] = {k: [a[k], b.get(k)] for k in a
                        if not k.startswith("_") and k not in ("architectures", "dtype", "torch_dtype",
                                                               "transformers_version") and a[k] != b.get(k)}
    print(json.dumps(report), flush=True)


def run(*command):
    print("$ " + " ".join(map(str, command)), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in command], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--sdtrain", type=Path, required=True)
    parser.add_argument("--convert-script", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    reference = folder_tensors(args.folder)
    ok = True

    ours = args.work / "ours.safetensors"
    run(args.sdtrain, "convert", "--model", args.folder, "--out", ours)
    ok &= compare("ours read by diffusers from_single_file", from_single_file(ours, args.folder), reference)
    run(args.sdtrain, "convert", "--model", ours, "--out", args.work / "ours-back")
    ok &= compare("round trip folder -> single file -> folder", folder_tensors(args.work / "ours-back"),
                  reference)
    compare_configs("configs built from the file that differ from F's", args.work / "ours-back", args.folder)

    theirs = args.work / "theirs.safetensors"
    run(sys.executable, args.convert_script, "--model_path", hub_layout(args.folder, args.work / "hub-layout"),
        "--checkpoint_path", theirs, "--use_safetensors")
    run(args.sdtrain, "convert", "--model", theirs, "--out", args.work / "theirs-back")
    ok &= compare("diffusers' conversion read by sdtrain vs by diffusers from_single_file",
                  folder_tensors(args.work / "theirs-back"), from_single_file(theirs, args.folder))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
