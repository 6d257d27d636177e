"""Full-size parity data (testing tier 3): random-init diffusers models at the real SD configs.

Writes, under OUT (default /tmp/sdtrain-full-size), for each config in tests/fixtures/configs
(unet_sd21_base, unet_sd15, vae_sd21_base): the model folder (save_pretrained; 3.5 GB per UNet
in fp32) and <name>_io.safetensors with inputs and outputs at a small spatial size, so that the
C++ side can be checked at real widths (head dim 64/40/160, cross dim 1024/768, 4 levels) that
the tiny committed fixtures do not have. Then run

    SDTRAIN_FULL_SIZE_FIXTURES=OUT build/tests/test_models --gtest_filter='FullSize*'

Not run in CI (size and time); results are recorded in docs/models.md.
"""
import argparse
import json
import sys
from pathlib import Path

import diffusers
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent


def meta(name: str) -> dict:
    return {"format": "pt", "generator": "tools/make_full_size_parity.py", "fixture": name,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": sys.version.split()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path("/tmp/sdtrain-full-size"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    configs = REPO / "tests/fixtures/configs"
    for name in ("unet_sd21_base", "unet_sd15"):
        torch.manual_seed(0)
        config = json.loads((configs / name / "config.json").read_text())
        unet = UNet2DConditionModel.from_config(config).eval()
        unet.save_pretrained(args.out / name, safe_serialization=True)
        g = torch.Generator().manual_seed(1)
        sample = torch.randn((2, 4, 16, 16), generator=g)
        context = torch.randn((2, 77, unet.config.cross_attention_dim), generator=g)
        timestep = torch.tensor([1, 981])
        with torch.no_grad():
            out = unet(sample, timestep, encoder_hidden_states=context).sample
        save_file({"sample": sample, "timestep": timestep, "encoder_hidden_states": context, "out": out},
                  args.out / f"{name}_io.safetensors", metadata=meta(name))
        del unet
    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(json.loads((configs / "vae_sd21_base/config.json").read_text())).eval()
    vae.save_pretrained(args.out / "vae_sd21_base", safe_serialization=True)
    g = torch.Generator().manual_seed(2)
    x = torch.rand((1, 3, 64, 64), generator=g) * 2 - 1
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        decoded = vae.decode(posterior.mode()).sample
    save_file({"x": x, "mean": posterior.mean, "logvar": posterior.logvar, "decoded": decoded},
              args.out / "vae_sd21_base_io.safetensors", metadata=meta("vae_sd21_base"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
