"""Writes tests/fixtures/lora/linear.safetensors: peft's LoRA on an nn.Linear, for the C++ test.

A Linear(24, 16) with bias and a rank-4 adapter (lora_alpha 8, so a scale of 2) made by peft
exactly as diffusers' train_dreambooth_lora.py configures it (init_lora_weights="gaussian",
target the module), then B set to random values (a freshly initialised B is zero and would
test nothing), and the output on a fixed input, in float32 and under bf16 autocast on the CPU.
    python tools/make_lora_fixtures.py
"""
from pathlib import Path

import peft
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/lora"


class Holder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(24, 16)


def main():
    torch.manual_seed(0)
    model = Holder()
    config = peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=["proj"])
    model = peft.get_peft_model(model, config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.copy_(torch.randn_like(layer.lora_B["default"].weight) * 0.1)
    x = torch.randn(3, 5, 24)
    with torch.no_grad():
        y = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y_bf16 = layer(x)
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({
        "weight": layer.base_layer.weight.contiguous(), "bias": layer.base_layer.bias.contiguous(),
        "lora_A.weight": layer.lora_A["default"].weight.contiguous(),
        "lora_B.weight": layer.lora_B["default"].weight.contiguous(),
        "input": x, "output": y, "output_bf16_autocast": y_bf16.float(),
        "gaussian_init_std": torch.tensor([layer.lora_A["default"].weight.std().item()]),
    }, OUT / "linear.safetensors", metadata={"peft": peft.__version__, "torch": torch.__version__})
    print(f"wrote {OUT / 'linear.safetensors'} (peft {peft.__version__})")


if __name__ == "__main__":
    main()
