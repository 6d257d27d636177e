"""How far a sampler trajectory moves when its sigmas move by a few float32 ulp.

ATen's transcendental kernels round differently per CPU capability (scalar, AVX2, AVX-512), so
sigmas computed on one CPU differ from the fixtures' by up to a few ulp (measured, see
docs/parity.md). This replays every fixture trajectory of tools/make_scheduler_fixtures.py with
diffusers, once as recorded and once with every sigma (and alphas_cumprod, for DDIM/PNDM) moved
by a random +-ULPS ulp, and prints the largest relative difference of the samples per
config/sampler. The trajectory tolerance of tests/schedulers/sampler_parity_test.cpp must cover
this spread.

    ~/.cache/sdtrain/venv/bin/python tools/sigma_ulp_sensitivity.py [ULPS] [TRIALS]
"""
import sys

import numpy as np
import torch

sys.path.insert(0, __import__("os").path.dirname(__file__))
import make_scheduler_fixtures as fx  # noqa: E402


def nudge(tensor: torch.Tensor, ulps: int, rng: np.random.Generator) -> torch.Tensor:
    if tensor.dtype != torch.float32:
        return tensor
    steps = torch.from_numpy(rng.integers(-ulps, ulps + 1, size=tuple(tensor.shape)).astype(np.float32))
    return tensor + steps * (torch.nextafter(tensor.abs(), torch.tensor(np.inf)) - tensor.abs())


def run(scheduler, steps, seed, ulps, rng):
    scheduler.set_timesteps(steps)
    if ulps:
        for name in ("sigmas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
            if isinstance(getattr(scheduler, name, None), torch.Tensor):
                setattr(scheduler, name, nudge(getattr(scheduler, name), ulps, rng))
    generator = torch.Generator().manual_seed(seed)
    noise_generator = torch.Generator().manual_seed(fx.NOISE_SEED)
    sample = torch.randn(fx.SHAPE, generator=generator) * scheduler.init_noise_sigma
    kwargs = {"generator": noise_generator} if isinstance(scheduler, fx.EulerAncestralDiscreteScheduler) else {}
    samples = []
    for t in scheduler.timesteps:
        sample = scheduler.step(torch.randn(fx.SHAPE, generator=generator), t, sample, **kwargs).prev_sample
        samples.append(sample.to(torch.float64))
    return torch.stack(samples)


def main() -> None:
    ulps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    trials = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    rng = np.random.default_rng(0)
    worst = 0.0
    for index, (config_name, config) in enumerate(fx.CONFIGS.items()):
        for sampler in fx.SAMPLERS:
            for steps in fx.TRAJECTORIES.get(config_name, (10,)):
                probe = fx.make_scheduler(sampler, config)
                probe.set_timesteps(steps)
                if (probe.timesteps == probe.timesteps[0]).sum() > 1:
                    continue
                seed = 1000 * index + steps
                exact = run(fx.make_scheduler(sampler, config), steps, seed, 0, rng)
                spread = max(float((run(fx.make_scheduler(sampler, config), steps, seed, ulps, rng) - exact).abs().max()
                                   / exact.abs().max()) for _ in range(trials))
                worst = max(worst, spread)
                print(f"{config_name}/{sampler}/traj{steps}: {spread:.3g}")
    print(f"worst relative difference with sigmas moved by up to {ulps} ulp: {worst:.3g}")


if __name__ == "__main__":
    main()
