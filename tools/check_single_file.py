#!/usr/bin/env python3
"""Loads an sdtrain single-file export (model.safetensors, LDM layout) with diffusers'
StableDiffusionPipeline.from_single_file, taking the component configurations from the diffusers
folder the same run wrote (config=, as for any architecture that is not a published one), and
compares every UNet, VAE and text-encoder tensor with that folder's (from_pretrained). Prints one
JSON line: per component the tensors compared, those that differ and the keys one side lacks, and
the warnings diffusers/transformers logged. Used by tests/train/single_file_export_test.cpp.
"""
import argparse
import json
import logging

import torch
from check_exported_pipeline import Collect  # the same warning collector, beside this script
from diffusers import StableDiffusionPipeline


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", required=True)
    parser.add_argument("--folder", required=True)
    args = parser.parse_args()
    collect = Collect()
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).addHandler(collect)
    single = StableDiffusionPipeline.from_single_file(args.file, config=args.folder, local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    folder = StableDiffusionPipeline.from_pretrained(args.folder, safety_checker=None, requires_safety_checker=False)
    report = {"warnings": collect.messages, "components": {}}
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        shared = sorted(set(a) & set(b))
        report["components"][name] = {
            "compared": len(shared),
            "different": [k for k in shared if not torch.equal(a[k], b[k])][:5],
            "only_single_file": sorted(set(a) - set(b))[:5],
            "only_folder": sorted(set(b) - set(a))[:5],
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
