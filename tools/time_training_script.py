#!/usr/bin/env python3
"""Runs a Python training script (diffusers' examples/dreambooth/train_dreambooth*.py) unchanged
and reports, as one JSON line on stdout at exit, the time between its optimizer steps and the
peak CUDA memory allocated: the same two numbers sdtrain writes to logs/metrics.jsonl, for the
side-by-side runs of scripts/gpu-session.sh.

    python3 tools/time_training_script.py SCRIPT [script arguments ...]

Each call of torch.optim.Optimizer.step (accelerate's wrapper calls the wrapped optimizer's) is
time-stamped after a CUDA synchronisation; the first 10 intervals are dropped (warm-up, cuDNN
autotuning), as docs/benchmarks.md does for sdtrain.
"""
import atexit
import json
import runpy
import sys
import time

import torch

stamps = []


def timed(step):
    def wrapper(self, *args, **kwargs):
        result = step(self, *args, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        return result
    return wrapper


def report():
    intervals_sorted = sorted([b - a for a, b in zip(stamps, stamps[1:])][10:])
    print(json.dumps({
        "script": sys.argv[0],
        "steps": len(stamps),
        "median_seconds": intervals_sorted[len(intervals_sorted) // 2] if intervals_sorted else None,
        "p25_seconds": intervals_sorted[len(intervals_sorted) // 4] if intervals_sorted else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }), flush=True)


def main():
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    for optimizer in (torch.optim.AdamW, torch.optim.Adam):
        if "step" in optimizer.__dict__:
            optimizer.step = timed(optimizer.__dict__["step"])
    atexit.register(report)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
