"""Writes the UNet/VAE parity fixtures under tests/fixtures/models/ with diffusers (fixed seeds).

For each tiny model: the model folder in diffusers layout (config.json +
diffusion_pytorch_model.safetensors, as save_pretrained writes it) and `<name>_io.safetensors`
with the inputs, the outputs and, for the UNets, the gradients of a fixed scalar loss
sum(out * loss_weights) with respect to the inputs and (unet_sd2, unet_sd15) to every parameter
("grad.<key>").
The generator's versions are in each file's __metadata__. All tensors are float32 on CPU.

    ~/.cache/sdtrain/venv/bin/python tools/make_unet_vae_fixtures.py [tests/fixtures/models]

The UNets cover (SD features each one exercises):
  unet_sd2:   linear proj_in/out, head counts as a list, 3 levels, int timesteps, 77 tokens
  unet_sd15:  1x1 conv proj_in/out, head count as an int, 4 levels, layers_per_block 1,
              cross_attention_dim 12, scalar float timestep
  unet_upcast: upcast_attention true, 2 transformer layers per block, a latent size that is
              not a multiple of the up factor (upsample_size path), fractional timesteps
The VAE (4 levels, as SD's) is saved twice: vae/ with diffusers' names, vae_legacy/ with the
pre-0.14 attention names query/key/value/proj_attn that Hub checkpoints still carry.
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import diffusers
import numpy
import safetensors
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent


def metadata(name: str, seed: int) -> dict:
    return {"format": "pt", "generator": "tools/make_unet_vae_fixtures.py", "fixture": name,
            "seed": str(seed), "torch": torch.__version__, "diffusers": diffusers.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__,
            "python": sys.version.split()[0]}


def randomize_norms(model: torch.nn.Module, generator: torch.Generator) -> None:
    """GroupNorm/LayerNorm start at weight 1, bias 0 and several biases at 0: perturb every
    parameter slightly so that a mix-up of any two tensors would show in the outputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.05)


UNETS = {
    "unet_sd2": dict(
        config=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
                    block_out_channels=(8, 16, 16), norm_num_groups=4,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=(2, 4, 4), cross_attention_dim=16, use_linear_projection=True),
        batch=2, size=(8, 8), tokens=77, timestep=lambda: torch.tensor([10, 999])),
    "unet_sd15": dict(
        config=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                      "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                    "CrossAttnUpBlock2D"),
                    attention_head_dim=2, cross_attention_dim=12, use_linear_projection=False),
        batch=2, size=(16, 16), tokens=77, timestep=lambda: torch.tensor(500.5)),
    "unet_upcast": dict(
        config=dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                    block_out_channels=(8, 16, 16), norm_num_groups=4,
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                    attention_head_dim=(2, 2, 4), cross_attention_dim=16, use_linear_projection=True,
                    upcast_attention=True, transformer_layers_per_block=2),
        batch=1, size=(6, 10), tokens=5, timestep=lambda: torch.tensor([333.25]), grads=False),
}


def make_unet(out: Path, name: str, spec: dict, seed: int) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    unet = UNet2DConditionModel(**spec["config"])
    randomize_norms(unet, generator)
    unet.eval()
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    unet.save_pretrained(folder, safe_serialization=True)

    config = unet.config
    cross = config.cross_attention_dim
    h, w = spec["size"]
    sample = torch.randn((spec["batch"], config.in_channels, h, w), generator=generator).requires_grad_(True)
    context = torch.randn((spec["batch"], spec["tokens"], cross), generator=generator).requires_grad_(True)
    timestep = spec["timestep"]()
    out_tensor = unet(sample, timestep, encoder_hidden_states=context).sample
    loss_weights = torch.randn(out_tensor.shape, generator=generator)
    loss = (out_tensor * loss_weights).sum()
    loss.backward()

    tensors = {"sample": sample.detach(), "timestep": timestep, "encoder_hidden_states": context.detach(),
               "out": out_tensor.detach(), "loss_weights": loss_weights, "loss": loss.detach().reshape(1),
               "grad_input.sample": sample.grad, "grad_input.encoder_hidden_states": context.grad}
    if spec.get("grads", True):  # per-parameter gradients (skipped where they add nothing new)
        for key, p in unet.named_parameters():
            tensors["grad." + key] = p.grad
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / f"{name}_io.safetensors",
              metadata=metadata(name, seed))


LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def make_vae(out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
                        block_out_channels=(8, 16, 16, 16), norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, sample_size=32)
    randomize_norms(vae, generator)
    vae.eval()
    for name in ("vae", "vae_legacy"):
        shutil.rmtree(out / name, ignore_errors=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)

    # The same weights under the pre-0.14 attention names, as SD 1.5/2.1 Hub files have them.
    (out / "vae_legacy").mkdir()
    shutil.copy(out / "vae" / "config.json", out / "vae_legacy" / "config.json")
    legacy = {}
    for key, value in load_file(out / "vae" / "diffusion_pytorch_model.safetensors").items():
        for new, old in LEGACY.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy), "legacy names were not produced"
    save_file(legacy, out / "vae_legacy" / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
    # diffusers itself must load the legacy file to the same model.
    reloaded = AutoencoderKL.from_pretrained(out / "vae_legacy")
    for (k1, v1), (k2, v2) in zip(vae.state_dict().items(), reloaded.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2), k1

    # 24x40 -> latents 3x5: odd latent sizes exercise the asymmetric downsampling pad.
    x = torch.rand((2, 3, 24, 40), generator=generator) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        sample_generator = torch.Generator().manual_seed(1234)
        latents = posterior.sample(generator=sample_generator)
        decoded = vae.decode(latents).sample
        decoded_mode = vae.decode(posterior.mode()).sample
    tensors = {"x": x, "mean": posterior.mean, "logvar": posterior.logvar, "std": posterior.std,
               "sample_seed1234": latents, "decoded": decoded, "decoded_mode": decoded_mode}
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "vae_io.safetensors",
              metadata={**metadata("vae", seed), "sample_generator": "torch.Generator().manual_seed(1234)"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=REPO / "tests/fixtures/models")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for index, (name, spec) in enumerate(UNETS.items()):
        make_unet(args.out, name, spec, seed=100 + index)
    make_vae(args.out, seed=200)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
