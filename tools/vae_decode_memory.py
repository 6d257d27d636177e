#!/usr/bin/env python3
"""How much memory one VAE decode holds at a batch size: diffusers' AutoencoderKL built with
random weights from a component config (e.g. tests/fixtures/configs/vae_sd21_base/config.json),
then one decode of [batch, 4, 64, 64] latents (512x512 images) without gradients, fp32 on the
CPU. Reported: the growth of the process's peak resident memory (ru_maxrss) during the decode,
so run one process per batch size. It is why validation decodes one image at a time
(docs/memory.md); a GPU's fp16 figures are its own.

    python3 tools/vae_decode_memory.py tests/fixtures/configs/vae_sd21_base/config.json 4
"""
import argparse
import json
import resource

import torch
from diffusers import AutoencoderKL


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("batch", type=int)
    parser.add_argument("--latent-size", type=int, default=64)
    args = parser.parse_args()
    config = {k: v for k, v in json.load(open(args.config)).items() if not k.startswith("_")}
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(config).eval()
    latents = torch.randn(args.batch, config.get("latent_channels", 4), args.latent_size,
                          args.latent_size)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        vae.decode(latents)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"batch": args.batch, "threads": torch.get_num_threads(),
                      "peak_growth_gib": round((after - before) / 2 ** 20, 2)}))


if __name__ == "__main__":
    main()
