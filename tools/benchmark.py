#!/usr/bin/env python3
"""The project's GPU benchmark: steps/s and peak memory of sdtrain at a table of settings, beside
diffusers' train_dreambooth.py where it is given, with the plan's memory estimate for each row.

    python3 tools/benchmark.py --sdtrain build/sdtrain \
        [--diffusers-script path/to/diffusers/examples/dreambooth/train_dreambooth.py] \
        [--model /tmp/sd21] [--steps 30] [--rows today,exact,lean,...] [--out /tmp/bench] \
        [--write docs/benchmarks.md]

What it runs (docs/memory.md explains the settings; docs/benchmarks.md holds the results):
  * a random-weight SD 2.1-base folder at the real configs (tools/make_full_size_model.py; built
    once into --model when missing, which needs diffusers), the bundled demo's generated photos
    as instance and class images;
  * every row at 512x512, batch 1 + prior preservation (the batch-32 row: 32 without), fp16
    autocast, through `sdtrain --dry-run` (the estimate) and then `sdtrain` (--steps optimizer
    steps, no checkpoints, no validation but in row lean-validation);
  * for the rows that have one, the same run through train_dreambooth.py, timed by
    tools/time_training_script.py.
Timing: median seconds between optimizer steps after the first 10 (warm-up, cuDNN autotuning),
from logs/metrics.jsonl; memory: the peaks allocated and reserved by the caching allocator
during training (a CUDA graph's pool is reserved, not allocated, between replays).
Throughput: samples/s, the speed-up over diffusers, the model FLOPs per step counted by
tools/flop_count.py and their share of the GPU's dense fp16 peak; start-up: the load time and
the time to the first step, from the trainer's log.
Goals: below the table, each measurable goal of issues 15 and 16 (speed-up, batch-32 samples/s,
captured against eager reserved memory, the memory ceilings, the estimate's error) checked
against the rows that ran. Under them, the attention kernels each row's log names.
The table goes to OUT/benchmark.md and, with --write, between the benchmark markers of that file.
"""
import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- benchmark:begin -->", "<!-- benchmark:end -->"
GIB = 1024 ** 3

# name -> (what it shows, sdtrain --set overrides, train_dreambooth.py extra arguments or None).
# Common to all: 512, batch 1 + prior preservation, fp16, gradient checkpointing unless a row
# turns it off, learning rate 2e-6 (train_dreambooth.py's documented value).
ROWS = {
    "today": ("before issue 15: 8-bit AdamW, every gradient held, VAE and text encoder on the GPU",
              ["optimizer=adamw8bit", "cache_latents=false", "fused_backward_pass=false"],
              ["--use_8bit_adam"]),
    "today-eager": ("row `today` with cuda_graphs false: what replaying the pass from a CUDA "
                    "graph gains (issue 16)",
                    ["optimizer=adamw8bit", "cache_latents=false", "fused_backward_pass=false",
                     "cuda_graphs=false"], None),
    "today-fused": ("row `today` with fused_group_norm_silu true: what one GroupNorm + SiLU node "
                    "with CUDA kernels gains (issue 16)",
                    ["optimizer=adamw8bit", "cache_latents=false", "fused_backward_pass=false",
                     "fused_group_norm_silu=true"], None),
    "today-cl": ("row `today-fused` with channels_last true: what NHWC convolutions, with no "
                 "transposes around cuDNN, gain (issue 16)",
                 ["optimizer=adamw8bit", "cache_latents=false", "fused_backward_pass=false",
                  "fused_group_norm_silu=true", "channels_last=true"], None),
    "today-cudnn": ("row `today` with attention_backend cudnn: whether cuDNN's attention beats "
                    "flash attention, torch's first choice (issue 16)",
                    ["optimizer=adamw8bit", "cache_latents=false", "fused_backward_pass=false",
                     "attention_backend=cudnn"], None),
    "exact": ("exact mode: + fused backward pass, cached latents (VAE and text encoder off the GPU)",
              ["optimizer=adamw8bit", "cache_latents=true", "fused_backward_pass=true",
               "max_grad_norm=0"], None),
    "exact-eager": ("row `exact` with cuda_graphs false: what capturing the pass with the "
                    "optimizer's steps in it gains (issue 16)",
                    ["optimizer=adamw8bit", "cache_latents=true", "fused_backward_pass=true",
                     "max_grad_norm=0", "cuda_graphs=false"], None),
    "lean": ("lean mode: + bf16 weights with stochastic rounding",
             ["optimizer=adamw8bit", "cache_latents=true", "fused_backward_pass=true",
              "max_grad_norm=0", "weight_dtype=bf16"], None),
    "lean-validation": ("row `lean` with 4 validation images every 10 steps: whether validation "
                        "(the frozen models back on the GPU, one image decoded at a time, the "
                        "graph released) stays inside the lean ceiling",
                        ["optimizer=adamw8bit", "cache_latents=true", "fused_backward_pass=true",
                         "max_grad_norm=0", "weight_dtype=bf16",
                         'validation_prompts=["a photo of sks robot"]', "validation_steps=10",
                         "num_validation_images=4"], None),
    "text-encoder": ("exact mode with the text encoder trained",
                     ["optimizer=adamw8bit", "cache_latents=true", "fused_backward_pass=true",
                      "max_grad_norm=0", "train_text_encoder=true"],
                     ["--use_8bit_adam", "--train_text_encoder"]),
    "budget-6": ("memory_budget 6: the plan's own choice",
                 ["optimizer=adamw", "gradient_checkpointing=false", "memory_budget=6"], None),
    "lora": ("LoRA rank 4 on UNet + text encoder, AdamW (issue 13)",
             ["train_mode=lora", "train_text_encoder=true", "optimizer=adamw",
              "learning_rate=1e-4", "cache_latents=true"], None),
    "batch-32": ("throughput: batch 32 without prior preservation, cached latents, no "
                 "checkpointing (issue 16: >= 80 samples/s on an H100, MLPerf's 128 the ceiling)",
                 ["optimizer=adamw8bit", "cache_latents=true", "gradient_checkpointing=false",
                  "train_batch_size=32", "with_prior_preservation=false",
                  "fused_backward_pass=false"], None),
    "batch-32-cl": ("row `batch-32` with fused_group_norm_silu and channels_last: at this size "
                    "the convolutions and normalisations are the step, so the transposes the "
                    "two remove weigh most here",
                    ["optimizer=adamw8bit", "cache_latents=true", "gradient_checkpointing=false",
                     "train_batch_size=32", "with_prior_preservation=false",
                     "fused_backward_pass=false", "fused_group_norm_silu=true",
                     "channels_last=true"], None),
    "ddp-1": ("row `today` under torchrun, one process: the data-parallel path's overhead "
              "(NCCL, bucketed all-reduce, no CUDA graph; issue 17, target <= 3% over "
              "`today-eager`)",
              ["optimizer=adamw8bit", "cache_latents=false", "fused_backward_pass=false"], None),
}

# Rows started by a launcher instead of directly.
LAUNCHERS = {"ddp-1": [sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", "1", "--no-python"]}


def run(command, log, env=None, timeout=600):
    with open(log, "w") as out:
        return subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout).returncode


def prepare(args):
    model = Path(args.model)
    if not (model / "model_index.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_full_size_model.py"), str(model)],
                       check=True)
    photos = Path(args.out) / "photos"
    if not photos.exists():
        # The demo's generated photos, each 8 times (32: one batch of the batch-32 row), and its
        # dataset_info.json.
        photos.mkdir(parents=True)
        for item in (ROOT / "configs" / "demo" / "instance").iterdir():
            if item.suffix == ".json":
                shutil.copy(item, photos / item.name)
                continue
            for copy in range(8):
                shutil.copy(item, photos / f"{item.stem}-{copy}{item.suffix}")
    return model, photos


def row_shape(overrides):
    """(train_batch_size, prior preservation, text encoder trained) of a row."""
    settings = dict(o.split("=", 1) for o in overrides)
    return (int(settings.get("train_batch_size", 1)),
            settings.get("with_prior_preservation", "true") == "true",
            settings.get("train_text_encoder", "false") == "true")


def samples_per_step(overrides):
    batch, prior, _ = row_shape(overrides)
    return batch * (2 if prior else 1)


def counted_flops(args, overrides, cache={}):
    """The row's model FLOPs per step (tools/flop_count.py), counted once per shape."""
    batch, prior, text_encoder = row_shape(overrides)
    key = (samples_per_step(overrides), text_encoder)
    if key not in cache:
        sys.path.insert(0, str(ROOT / "tools"))
        from flop_count import step_flops
        try:
            cache[key] = step_flops(args.model, key[0], args.resolution, text_encoder)
        except Exception as error:  # no diffusers here: the table says so instead
            print(f"FLOPs not counted: {error}", file=sys.stderr)
            cache[key] = None
    return cache[key]


def startup_seconds(log_text):
    """(models loaded in, first step after) as the sdtrain log states them, in seconds."""
    loaded = re.search(r"models loaded in ([0-9.e+-]+) s", log_text)
    first = re.search(r"first step ([0-9.e+-]+) s after the run started", log_text)
    return (float(loaded.group(1)) if loaded else None, float(first.group(1)) if first else None)


def sdtrain_settings(args, model, photos, output, overrides):
    settings = [
        f"pretrained_model_name_or_path={model}", f"instance_data_dir={photos}",
        f"class_data_dir={photos}", f"output_dir={output}", f"resolution={args.resolution}", "center_crop=true",
        "train_batch_size=1", f"max_steps={args.steps}", "with_prior_preservation=true",
        "num_class_images=4", "instance_prompt=a photo of sks robot",
        "class_prompt=a photo of a robot", f"mixed_precision={args.mixed_precision}",
        "gradient_checkpointing=true",
        "learning_rate=2e-6", "checkpointing_steps=100000", "validation_prompts=[]",
        "save_dtype=fp16", f"device={args.device}", "seed=0"]
    settings += overrides
    return [a for s in settings for a in ("--set", s)]


def median_and_peaks(metrics):
    """Median s/step after the first 10, and the run's peak allocated and reserved bytes."""
    records = [json.loads(line) for line in open(metrics)]
    seconds = [r["seconds"] for r in records[10:]]
    return (statistics.median(seconds) if seconds else None,
            max(r.get("peak_memory_bytes", 0) for r in records),
            max(r.get("peak_reserved_bytes", 0) for r in records))


def run_sdtrain(args, name, overrides, model, photos):
    output = Path(args.out) / f"sdtrain-{name}"
    common = sdtrain_settings(args, model, photos, output, overrides)
    dry_log = Path(args.out) / f"sdtrain-{name}-dry-run.log"
    run([args.sdtrain, "train", "--dry-run", "--config", str(args.config)] + common, dry_log)
    found = re.search(r"memory estimate \([^)]*\): ([0-9.]+) MiB", dry_log.read_text())
    estimate = float(found.group(1)) * 2 ** 20 if found else None
    log = Path(args.out) / f"sdtrain-{name}.log"
    code = run(LAUNCHERS.get(name, []) +
               [args.sdtrain, "train", "--overwrite", "--config", str(args.config)] + common, log)
    metrics = output / "logs" / "metrics.jsonl"
    if code != 0 or not metrics.exists():
        return {"rc": code, "estimate": estimate}
    seconds, peak, reserved = median_and_peaks(metrics)
    text = log.read_text()
    load, first_step = startup_seconds(text)
    kernels = re.search(r"attention kernels: (.*)", text)
    return {"rc": code, "seconds": seconds, "peak": peak, "reserved": reserved,
            "estimate": estimate, "load": load, "first_step": first_step,
            "attention": kernels.group(1).strip() if kernels else None}


def run_diffusers(args, name, extra, model, photos):
    log = Path(args.out) / f"diffusers-{name}.log"
    note = ""
    if "--use_8bit_adam" in extra and importlib.util.find_spec("bitsandbytes") is None:
        extra = [a for a in extra if a != "--use_8bit_adam"]
        note = " (AdamW: no bitsandbytes here)"
    command = [sys.executable, str(ROOT / "tools" / "time_training_script.py"), args.diffusers_script,
               f"--pretrained_model_name_or_path={model}", f"--instance_data_dir={photos}",
               f"--class_data_dir={photos}", "--with_prior_preservation", "--num_class_images=4",
               "--instance_prompt=a photo of sks robot", "--class_prompt=a photo of a robot",
               f"--resolution={args.resolution}", "--center_crop", "--train_batch_size=1",
               f"--max_train_steps={args.steps}", "--learning_rate=2e-6", f"--mixed_precision={args.mixed_precision}",
               "--gradient_checkpointing", "--checkpointing_steps=100000", "--seed=0",
               f"--output_dir={Path(args.out) / ('diffusers-' + name)}"] + extra
    code = run(command, log)
    lines = [l for l in log.read_text().splitlines() if l.startswith("{\"script\"")]
    if code != 0 or not lines:
        return {"rc": code, "note": note}
    report = json.loads(lines[-1])
    return {"rc": code, "seconds": report["median_seconds"], "peak": report["peak_memory_bytes"],
            "note": note}


def discard_weights(args, name):
    """Removes what a row wrote besides its logs: at 512² each row's exported model is 2.6 GB
    for sdtrain (fp16) and 5 GB for diffusers (fp32), more than a GPU machine's disk holds for
    every row."""
    ours = Path(args.out) / f"sdtrain-{name}"
    if ours.is_dir():
        for item in ours.iterdir():
            if item.name != "logs":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    shutil.rmtree(Path(args.out) / f"diffusers-{name}", ignore_errors=True)


def machine():
    query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
    try:
        gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except OSError:
        gpu = "no nvidia-smi"
    import torch
    # The GPU machine gets a working tree without .git: scripts/gpu-pack.sh records the commit.
    commit = os.environ.get("SDTRAIN_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True, text=True).stdout.strip() or "(not a git tree)"
    return f"{gpu}; torch {torch.__version__}; sdtrain commit {commit}"


def cell_seconds(result):
    if result is None:
        return "—"
    if result.get("seconds") is None:
        return f"failed (rc {result['rc']}){result.get('note', '')}"
    return f"{result['seconds']:.4f}{result.get('note', '')}"


def cell_gib(result, key):
    value = None if result is None else result.get(key)
    return "—" if value is None else f"{value / GIB:.2f}"


def gpu_name():
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def throughput_cells(name, ours, theirs, args, today_theirs=None):
    """samples/s, speed-up over diffusers, TFLOP/step and utilisation of the GPU's dense peak.
    A row without its own diffusers run that trains what row `today` trains (batch 1 + prior,
    UNet only) is compared with today's: the same train_dreambooth.py job, since the rows differ
    only in how sdtrain holds memory and launches work; the cell says so with a dagger."""
    overrides = ROWS[name][1]
    if ours.get("seconds") is None:
        return ["—"] * 4
    samples = samples_per_step(overrides) / ours["seconds"]
    speedup = "—"
    if theirs and theirs.get("seconds"):
        speedup = f"{theirs['seconds'] / ours['seconds']:.2f}×"
    elif (today_theirs and today_theirs.get("seconds")
          and row_shape(overrides) == row_shape(ROWS["today"][1])):
        speedup = f"{today_theirs['seconds'] / ours['seconds']:.2f}×†"
    flops = counted_flops(args, overrides)
    if flops is None:
        return [f"{samples:.1f}", speedup, "—", "—"]
    sys.path.insert(0, str(ROOT / "tools"))
    from flop_count import dense_peak
    peak = dense_peak(gpu_name())
    mfu = "—" if peak is None else f"{100.0 * flops / ours['seconds'] / peak:.1f} %"
    return [f"{samples:.1f}", speedup, f"{flops / 1e12:.2f}", mfu]


def cell_number(result, key):
    value = None if result is None else result.get(key)
    return "—" if value is None else f"{value:.2f}"


def table(results, args):
    lines = [BEGIN, "", f"- **Machine:** {machine()}",
             f"- **Date:** {datetime.date.today().isoformat()}",
             f"- **Command:** `python3 tools/benchmark.py --steps {args.steps}"
             + (" --diffusers-script …/train_dreambooth.py" if args.diffusers_script else "") + "`",
             f"- **Run:** {Path(args.model).name} (random weights), {args.resolution}², batch 1 + prior "
             f"preservation, {args.mixed_precision}, {args.device}, "
             f"gradient checkpointing, {args.steps} steps; median after 10.", "",
             "- **Throughput:** samples/s counts instance and class rows; TFLOP/step is the "
             "model's forward + backward counted by `tools/flop_count.py` (recompute under "
             "checkpointing not counted); utilisation is that over the GPU's dense fp16 peak. "
             "Load: the trainer's `models loaded in` line; first step: its `first step … after "
             "the run started` line (class images, loading, latent caching). † against row "
             "`today`'s diffusers run (the same job).",
             "- **Memory:** peak is allocated (diffusers: `torch.cuda.max_memory_allocated`); "
             "reserved is what the caching allocator held from the driver, which counts a CUDA "
             "graph's pool between replays: captured and eager rows compare by it.", "",
             "| row | settings | sdtrain s/step | sdtrain peak GiB | sdtrain reserved GiB "
             "| estimate GiB | estimate error "
             "| diffusers s/step | diffusers peak GiB | samples/s | vs diffusers | TFLOP/step "
             "| utilisation | load s | first step s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, (ours, theirs) in results.items():
        error = "—"
        if ours.get("peak") and ours.get("estimate"):
            error = f"{100.0 * (ours['estimate'] - ours['peak']) / ours['peak']:+.1f} %"
        cells = throughput_cells(name, ours, theirs, args, results.get("today", (None, None))[1])
        lines.append(f"| {name} | {ROWS[name][0]} | {cell_seconds(ours)} | {cell_gib(ours, 'peak')} "
                     f"| {cell_gib(ours, 'reserved')} "
                     f"| {cell_gib(ours, 'estimate')} | {error} | {cell_seconds(theirs)} "
                     f"| {cell_gib(theirs, 'peak')} | {' | '.join(cells)} "
                     f"| {cell_number(ours, 'load')} | {cell_number(ours, 'first_step')} |")
    return "\n".join(lines + [""] + goal_lines(results) + [""] + attention_lines(results)
                     + ["", END])


def attention_lines(results):
    """The attention kernels each row's log names (models/attention_backend.h), rows with the
    same kernels on one line."""
    rows_by_kernels = {}
    for name, (ours, _) in results.items():
        if ours.get("attention"):
            rows_by_kernels.setdefault(ours["attention"], []).append(f"`{name}`")
    lines = ["Attention kernels (the trainer's log after the first step):"]
    lines += [f"- {', '.join(rows)}: {kernels}" for kernels, rows in rows_by_kernels.items()]
    return lines if rows_by_kernels else []


def ratio_check(what, value, required, target, unit="×", higher_is_better=True):
    """One line of the goals: the measured value against what is required and what is aimed at."""
    if value is None:
        return f"- {what}: not measured (a row missing or failed)"
    met = value >= required if higher_is_better else value <= required
    reached = value >= target if higher_is_better else value <= target
    sign = "≥" if higher_is_better else "≤"
    verdict = "target reached" if reached else ("required met" if met else "NOT MET")
    return (f"- {what}: {value:.2f}{unit} (required {sign} {required}{unit}, target {sign} "
            f"{target}{unit}): {verdict}")


def goal_lines(results):
    """The issues' measurable goals, each checked against this run's rows (issue 15: memory,
    issue 16: speed and the captured step's memory). A goal whose rows did not run says so."""
    def row(name, side=0, key="seconds"):
        pair = results.get(name)
        value = None if pair is None or pair[side] is None else pair[side].get(key)
        return value

    def speedup(name):
        ours, theirs = row(name), row("today", side=1)
        return theirs / ours if ours and theirs else None

    def samples(name):
        seconds = row(name)
        return samples_per_step(ROWS[name][1]) / seconds if seconds else None

    def gib(name, key="peak"):
        value = row(name, key=key)
        return value / GIB if value else None

    def no_higher(captured, eager):
        a, b = row(captured, key="reserved"), row(eager, key="reserved")
        if not a or not b:
            return f"- issue 16: `{captured}` reserved ≤ `{eager}` reserved: not measured"
        return (f"- issue 16: `{captured}` reserved ≤ `{eager}` reserved (captured holds no "
                f"more): {a / GIB:.2f} vs {b / GIB:.2f} GiB: {'met' if a <= b else 'NOT MET'}")

    throughput = [v for v in (samples("batch-32"), samples("batch-32-cl")) if v]
    errors = [abs(r[0]["estimate"] - r[0]["peak"]) / r[0]["peak"] * 100
              for r in results.values() if r[0].get("peak") and r[0].get("estimate")]
    return ["**Goals** (checked by the program against the rows above):", "",
            ratio_check("issue 16: `today` against diffusers' steps/s", speedup("today"), 4, 5),
            ratio_check("issue 16: samples/s at batch 32 (best of `batch-32`, `batch-32-cl`)",
                        max(throughput) if throughput else None, 80, 100, unit=""),
            # The rows' class images are the instance photos, already on disk: the issue's
            # "cached class images" start.
            ratio_check("issue 16: `today` first step, seconds after the start (cached class "
                        "images)", row("today", key="first_step"), 15, 15, unit=" s",
                        higher_is_better=False),
            no_higher("today", "today-eager"),
            no_higher("exact", "exact-eager"),
            ratio_check("issue 15: `exact` peak GiB", gib("exact"), 6, 6, unit=" GiB",
                        higher_is_better=False),
            ratio_check("issue 15: `lean` peak GiB", gib("lean"), 4, 4, unit=" GiB",
                        higher_is_better=False),
            ratio_check("issue 15: `lean-validation` reserved GiB (validation within the "
                        "lean ceiling)", gib("lean-validation", key="reserved"), 4, 4,
                        unit=" GiB", higher_is_better=False),
            ratio_check("issue 15: `text-encoder` peak GiB", gib("text-encoder"), 8, 8,
                        unit=" GiB", higher_is_better=False),
            ratio_check("issue 15: the largest estimate error over the rows",
                        max(errors) if errors else None, 10, 10, unit=" %",
                        higher_is_better=False)]


def write_into(path, text, begin=BEGIN, end=END,
               heading="## Lean memory (issue 15): the benchmark program"):
    """Puts text (which starts with begin and ends with end) in place of the marked block of the
    Markdown file at path, or at its end under heading when it has none."""
    document = path.read_text() if path.exists() else ""
    if begin in document and end in document:
        document = document[:document.index(begin)] + text + document[document.index(end) + len(end):]
    else:
        document = document.rstrip("\n") + f"\n\n{heading}\n\n" + text + "\n"
    path.write_text(document)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sdtrain", default=str(ROOT / "build" / "sdtrain"))
    parser.add_argument("--diffusers-script", help="diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--model", default="/tmp/sd21")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--out", default="/tmp/sdtrain-benchmark")
    parser.add_argument("--write", help="a Markdown file to put the table in (docs/benchmarks.md)")
    # For a smoke run of the program itself on a CPU (the demo model at 64, bf16); the table's
    # figures mean something only at the defaults on a GPU.
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--mixed-precision", default="fp16")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep each row's trained model (by default only its logs stay)")
    args = parser.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.config = Path(args.out) / "base.json"
    args.config.write_text("{}\n")  # every setting comes from --set, stated above
    model, photos = prepare(args)
    results = {}
    for name in args.rows.split(","):
        description, overrides, diffusers_extra = ROWS[name]
        ours = run_sdtrain(args, name, overrides, model, photos)
        theirs = None
        if args.diffusers_script and diffusers_extra is not None:
            theirs = run_diffusers(args, name, diffusers_extra, model, photos)
        results[name] = (ours, theirs)
        print(name, json.dumps(ours), json.dumps(theirs), flush=True)
        if not args.keep_outputs:
            discard_weights(args, name)
        # After every row, so that a time-out keeps the table of the rows that ran.
        text = table(results, args)
        (Path(args.out) / "benchmark.md").write_text(text + "\n")
        (Path(args.out) / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    if args.write:
        write_into(Path(args.write), text)
    print(text)


if __name__ == "__main__":
    main()
