#!/usr/bin/env python3
"""FLOPs of one DreamBooth training step, counted (not estimated) for the benchmark's model FLOPs
utilisation: diffusers' UNet2DConditionModel (and transformers' CLIPTextModel when the text
encoder trains) is built from the model folder's config.json on PyTorch's meta device, and one
forward and backward pass at the step's shapes runs under torch.utils.flop_counter.FlopCounterMode,
which adds up the FLOPs of every matmul, convolution and attention the passes dispatch.

What is counted is the model's work: 1 forward + 1 backward. Gradient checkpointing recomputes
forwards in the backward pass; that recompute is not counted (the convention of model FLOPs
utilisation, as MLPerf and the PaLM paper count it), so a checkpointed step shows lower
utilisation for the same GPU work. The VAE is not counted (the benchmark caches latents or
encodes without gradients, a small share), nor are element-wise operations (norms, activations:
no multiply-adds on tensor cores).

    python3 tools/flop_count.py /tmp/sd21 --batch 2 --resolution 512 [--text-encoder]
"""
import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense fp16/bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (no sparsity), by the
# name nvidia-smi reports. A GPU not listed gets no utilisation figure rather than a guess.
DENSE_PEAK = {
    "H100 80GB HBM3": 989.4e12,   # H100 SXM5
    "H100 PCIe": 756.0e12,
    "H200": 989.4e12,
    "A100-SXM4-80GB": 312.0e12,
    "A100-SXM4-40GB": 312.0e12,
}


def dense_peak(gpu_name):
    for name, peak in DENSE_PEAK.items():
        if name in gpu_name:
            return peak
    return None


def load_config(model, component):
    config = json.loads((Path(model) / component / "config.json").read_text())
    return {k: v for k, v in config.items() if not k.startswith("_")}


def step_flops(model, batch, resolution, text_encoder=False):
    """FLOPs of one forward + backward at `batch` samples (instance + class rows together)."""
    from diffusers import UNet2DConditionModel
    unet_config = load_config(model, "unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config)
        encoder = None
        if text_encoder:
            from transformers import CLIPTextConfig, CLIPTextModel
            encoder = CLIPTextModel(CLIPTextConfig(**load_config(model, "text_encoder")))
        side = resolution // 8
        sample = torch.randn(batch, unet_config["in_channels"], side, side)
        timesteps = torch.randint(0, 1000, (batch,))
        ids = torch.zeros(batch, 77, dtype=torch.long)
        width = unet_config["cross_attention_dim"]
    counter = FlopCounterMode(display=False)
    with counter:
        if encoder is not None:
            states = encoder(ids.to("meta"))[0]
        else:
            states = torch.randn(batch, 77, width, device="meta")
        out = unet(sample, timesteps, states).sample
        out.float().pow(2).mean().backward()
    return counter.get_total_flops()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--text-encoder", action="store_true")
    args = parser.parse_args()
    flops = step_flops(args.model, args.batch, args.resolution, args.text_encoder)
    print(json.dumps({"batch": args.batch, "resolution": args.resolution,
                      "text_encoder": args.text_encoder, "tflop_per_step": flops / 1e12}))


if __name__ == "__main__":
    main()
