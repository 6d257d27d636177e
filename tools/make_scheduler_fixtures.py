"""Writes the sampler and noise-schedule fixtures under tests/fixtures/schedulers/ with diffusers.

For each scheduler config (`<config>.json`, as a model folder's scheduler_config.json) and each
sampler name of sdtrain (ddim, pndm, euler, euler_a, dpm++2m, dpm++2m_karras), the diffusers
scheduler is built as a pipeline switches scheduler: `X.from_config(model_scheduler.config)`
(PNDM with skip_prk_steps=True, DPM-Solver with use_karras_sigmas set by the name). Stored in
samplers.safetensors, under `<config>/<sampler>/`:
  `n<N>.timesteps`, `n<N>.sigmas` (sigma-based samplers), `n<N>.init_noise_sigma` for N in STEPS;
  `traj<N>.sample0`, `.model_outputs` [N', ...], `.scaled_inputs` [N', ...], `.samples` [N', ...]:
  a whole run where the "model output" of step i is a fixed random tensor (saved), so the C++
  sampler fed the same outputs must reproduce every intermediate sample. euler_a draws its noise
  from torch.Generator("cpu").manual_seed(NOISE_SEED).
noise_schedule.safetensors: betas and alphas_cumprod per beta schedule, add_noise, velocity and
compute_snr for fixed inputs.

    ~/.cache/sdtrain/venv/bin/python tools/make_scheduler_fixtures.py [tests/fixtures/schedulers]
"""
import argparse
import json
import sys
from pathlib import Path

import diffusers
import numpy
import safetensors
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from diffusers.training_utils import compute_snr
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
STEPS = (1, 10, 25, 50)
TRAJECTORIES = {"sd21_base": (10, 25)}  # other configs: (10,)
SHAPE = (2, 4, 2, 4)
NOISE_SEED = 7

# SD 2.1-base's file as the Hub has it: no timestep_spacing, so each class uses its default.
SD21_BASE = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.10.0.dev0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": False,
             "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
CONFIGS = {
    "sd21_base": SD21_BASE,
    # What diffusers 0.42 writes for the same scheduler (the demo model): leading spelled out.
    "demo": json.loads((REPO / "configs/demo/model/scheduler/scheduler_config.json").read_text()),
    "trailing": {**SD21_BASE, "timestep_spacing": "trailing"},
    # SD 2.1 (768): DDIM, v-prediction, no timestep_spacing.
    "sd21_v": {**SD21_BASE, "_class_name": "DDIMScheduler", "prediction_type": "v_prediction"},
    # Only the class: linear betas, set_alpha_to_one and clip_sample at each class's default.
    "ddim_defaults": {"_class_name": "DDIMScheduler"},
    "cosine_linspace": {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "squaredcos_cap_v2",
                        "timestep_spacing": "linspace", "prediction_type": "v_prediction",
                        "set_alpha_to_one": True, "clip_sample": True, "clip_sample_range": 0.5},
    "euler_karras": {**SD21_BASE, "_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": True},
}
SAMPLERS = ("ddim", "pndm", "euler", "euler_a", "dpm++2m", "dpm++2m_karras")


def metadata(name: str) -> dict:
    return {"format": "pt", "generator": "tools/make_scheduler_fixtures.py", "fixture": name,
            "torch": torch.__version__, "diffusers": diffusers.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "python": sys.version.split()[0]}


def make_scheduler(name: str, config: dict):
    """The scheduler a pipeline gets from `X.from_config(pipe.scheduler.config)`."""
    source = getattr(diffusers, config["_class_name"]).from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(source.config)
    if name == "pndm":
        return PNDMScheduler.from_config(source.config, skip_prk_steps=True)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(source.config)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler.from_config(source.config)
    return DPMSolverMultistepScheduler.from_config(source.config, use_karras_sigmas=name.endswith("karras"))


def trajectory(scheduler, steps: int, seed: int) -> dict:
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(NOISE_SEED)
    sample = torch.randn(SHAPE, generator=generator) * scheduler.init_noise_sigma
    out = {"sample0": sample.clone()}
    outputs, scaled, samples = [], [], []
    kwargs = {"generator": noise_generator} if isinstance(scheduler, EulerAncestralDiscreteScheduler) else {}
    for t in scheduler.timesteps:
        scaled.append(scheduler.scale_model_input(sample, t))
        model_output = torch.randn(SHAPE, generator=generator)
        outputs.append(model_output)
        sample = scheduler.step(model_output, t, sample, **kwargs).prev_sample
        samples.append(sample)
    out.update(model_outputs=torch.stack(outputs), scaled_inputs=torch.stack(scaled), samples=torch.stack(samples))
    return out


def make_samplers(out: Path) -> None:
    tensors = {}
    for config_index, (config_name, config) in enumerate(CONFIGS.items()):
        (out / f"{config_name}.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for sampler in SAMPLERS:
            prefix = f"{config_name}/{sampler}"
            for steps in STEPS:
                scheduler = make_scheduler(sampler, config)
                scheduler.set_timesteps(steps)
                tensors[f"{prefix}/n{steps}.timesteps"] = scheduler.timesteps.clone()
                if hasattr(scheduler, "sigmas"):
                    tensors[f"{prefix}/n{steps}.sigmas"] = scheduler.sigmas.clone()
                tensors[f"{prefix}/n{steps}.init_noise_sigma"] = torch.tensor(
                    [float(scheduler.init_noise_sigma)], dtype=torch.float64)
            for steps in TRAJECTORIES.get(config_name, (10,)):
                probe = make_scheduler(sampler, config)
                probe.set_timesteps(steps)
                if (probe.timesteps == probe.timesteps[0]).sum() > 1:
                    # diffusers starts such a run at the repeated timestep's second index and
                    # runs off its sigmas (cosine betas with Karras sigmas): nothing to compare.
                    continue
                seed = 1000 * config_index + steps
                for key, value in trajectory(make_scheduler(sampler, config), steps, seed).items():
                    tensors[f"{prefix}/traj{steps}.{key}"] = value
    # A DPM-Solver folder as diffusers saves it: lambda_min_clipped is written as -Infinity.
    saved = out / "dpm_saved"
    DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                use_karras_sigmas=True).save_config(saved)
    assert "-Infinity" in (saved / "scheduler_config.json").read_text()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "samplers.safetensors",
              metadata=metadata("samplers"))


def make_noise_schedule(out: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    x0 = torch.randn((4, 4, 3, 3), generator=generator)
    noise = torch.randn((4, 4, 3, 3), generator=generator)
    timesteps = torch.tensor([0, 1, 500, 999])
    trained = (torch.rand(1000, generator=generator, dtype=torch.float64) * 0.02).tolist()
    schedules = {
        "linear": dict(beta_schedule="linear"),
        "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
        "trained": dict(trained_betas=trained),
    }
    tensors = {"x0": x0, "noise": noise, "timesteps": timesteps}
    configs = {}
    for name, kwargs in schedules.items():
        for prediction in ("epsilon", "v_prediction"):
            if prediction == "v_prediction" and name != "scaled_linear":
                continue
            key = name if prediction == "epsilon" else f"{name}_v"
            scheduler = DDPMScheduler(prediction_type=prediction, **kwargs)
            configs[key] = {"_class_name": "DDPMScheduler", **scheduler.config}
            configs[key] = {k: v for k, v in configs[key].items() if not k.startswith("_use")}
            tensors[f"{key}.betas"] = scheduler.betas
            tensors[f"{key}.alphas_cumprod"] = scheduler.alphas_cumprod
            tensors[f"{key}.add_noise"] = scheduler.add_noise(x0, noise, timesteps)
            tensors[f"{key}.velocity"] = scheduler.get_velocity(x0, noise, timesteps)
            tensors[f"{key}.snr"] = compute_snr(scheduler, timesteps)
    (out / "noise_schedules.json").write_text(json.dumps(configs, indent=1, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in tensors.items()}, out / "noise_schedule.safetensors",
              metadata=metadata("noise_schedule"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=REPO / "tests/fixtures/schedulers")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_samplers(args.out)
    make_noise_schedule(args.out)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"wrote {args.out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
