"""Writes the learning-rate schedule and EMA fixtures under tests/fixtures/train/ with diffusers.

lr_schedules.json: for each case, the learning rate that diffusers' get_scheduler (a LambdaLR)
sets for optimizer steps 0, 1, ... (read from the optimizer before each step, as
train_dreambooth.py's loop uses it), a few steps past the end of training included.

ema.safetensors: diffusers' training_utils.EMAModel over 10 steps on three parameters, one of
which does not require a gradient (EMAModel copies those). Each step changes the parameters by
a seeded random amount and then calls ema.step(). Tensors:
  <run>.param.<name>.<k>   the parameters given to step k (k = 1..10); k = 0: the initial
                           values, which the shadow starts from
  <run>.shadow.<name>.<k>  the EMA shadow after step k
  <run>.decay              float64 [10], ema.cur_decay_value after each step
Runs: "defaults" (EMAModel's defaults) and "warmup" (use_ema_warmup, power 3/4, inv_gamma 2,
update_after_step 2, min_decay 0.3, decay 0.6: every clamp of get_decay is exercised).
The generator's versions are in the file's __metadata__ and in the JSON's "generator".

    ~/.cache/sdtrain/venv/bin/python tools/make_lr_ema_fixtures.py [tests/fixtures/train]
"""
import json
import sys
from pathlib import Path

import diffusers
import numpy
import safetensors
import torch
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
BASE_LR = 3e-4
STEPS = 50

LR_CASES = [
    dict(name="constant", warmup=5),
    dict(name="constant_with_warmup", warmup=5),
    dict(name="constant_with_warmup", warmup=0),
    dict(name="linear", warmup=5),
    dict(name="linear", warmup=0),
    dict(name="cosine", warmup=5),
    dict(name="cosine", warmup=0),
    dict(name="cosine_with_restarts", warmup=5, num_cycles=1),
    dict(name="cosine_with_restarts", warmup=5, num_cycles=3),
    dict(name="polynomial", warmup=5, power=1.0),
    dict(name="polynomial", warmup=5, power=2.0),
    dict(name="polynomial", warmup=0, power=0.5),
]

EMA_RUNS = {
    "defaults": dict(),
    "warmup": dict(decay=0.6, min_decay=0.3, update_after_step=2, use_ema_warmup=True, inv_gamma=2.0,
                   power=0.75),
}
EMA_SHAPES = {"conv.weight": (4, 3, 2), "conv.bias": (5,), "frozen": (2, 3)}


def versions() -> dict:
    return {"generator": "tools/make_lr_ema_fixtures.py", "torch": torch.__version__,
            "diffusers": diffusers.__version__, "safetensors": safetensors.__version__,
            "numpy": numpy.__version__, "python": sys.version.split()[0]}


def learning_rates(case: dict) -> list:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=BASE_LR)
    scheduler = get_scheduler(case["name"], optimizer, num_warmup_steps=case["warmup"],
                              num_training_steps=STEPS, num_cycles=case.get("num_cycles", 1),
                              power=case.get("power", 1.0))
    rates = []
    for _ in range(STEPS + 5):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def ema_run(run: str, options: dict, seed: int, tensors: dict) -> None:
    generator = torch.Generator().manual_seed(seed)
    params = {name: torch.nn.Parameter(torch.randn(shape, generator=generator), requires_grad=name != "frozen")
              for name, shape in EMA_SHAPES.items()}
    ema = EMAModel(list(params.values()), **options)
    for name, p in params.items():
        tensors[f"{run}.param.{name}.0"] = p.detach().clone()
    decays = []
    for k in range(1, 11):
        with torch.no_grad():
            for p in params.values():
                p.add_(torch.randn(p.shape, generator=generator) * 0.5)
        ema.step(list(params.values()))
        decays.append(ema.cur_decay_value)
        for (name, p), shadow in zip(params.items(), ema.shadow_params):
            tensors[f"{run}.param.{name}.{k}"] = p.detach().clone()
            tensors[f"{run}.shadow.{name}.{k}"] = shadow.detach().clone()
    tensors[f"{run}.decay"] = torch.tensor(decays, dtype=torch.float64)


def main():
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "tests/fixtures/train"
    out.mkdir(parents=True, exist_ok=True)
    cases = [dict(case, learning_rate=BASE_LR, total_steps=STEPS, rates=learning_rates(case)) for case in LR_CASES]
    with open(out / "lr_schedules.json", "w") as f:
        json.dump({"generator": versions(), "cases": cases}, f, indent=1)
        f.write("\n")

    tensors = {}
    for seed, (run, options) in enumerate(EMA_RUNS.items()):
        ema_run(run, options, seed, tensors)
    save_file(tensors, out / "ema.safetensors", metadata=dict(versions(), format="pt"))
    print(f"wrote {len(cases)} schedules and {len(tensors)} EMA tensors to {out}")


if __name__ == "__main__":
    main()
