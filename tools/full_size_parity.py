"""Full-size parity: sdtrain's model components against diffusers/transformers at the real configs.

For each config (SD 2.1-base, SD 1.5) and component (text_encoder, unet, vae), one at a time to
bound memory: builds the reference model with random weights (fixed seed) at the real config,
saves it as a diffusers model folder in a scratch directory (never the repository), runs the
reference on fixed inputs in float64 (the exact result for the stored float32 weights) and in
float32 (what users run), runs sdtrain's build/bench_model_forward on the same folder and inputs,
and writes a table of errors and timings into docs/parity.md between the markers
`<!-- full-size-parity:begin -->` and `<!-- full-size-parity:end -->`.

The VAE config is the same for SD 2.1-base and SD 1.5, so the VAE is compared once (under the
first config). Each row is checked against its component's tolerance (TOLERANCE, relative to the
output scale) and each component's parameter total against the reference model's and the known
real total (PARAMETERS); the table is written either way, and the tool exits 1 if any check
fails. Components that bench_model_forward does not list (`--list`) are skipped and named.
Uses a lot of CPU and memory (the float64 reference UNet alone is ~7 GB; `--reference-dtype
float32` halves it): set OMP_NUM_THREADS to the cores you can spare.

    OMP_NUM_THREADS=2 ~/.cache/sdtrain/venv/bin/python tools/full_size_parity.py \
        --scratch /tmp/sdtrain-parity
"""
import argparse
import gc
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import diffusers
import torch
import transformers
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from clip_bpe import write_tokenizer_files  # noqa: E402

BPE = REPO / "data/clip/merges.txt"
BEGIN, END = "<!-- full-size-parity:begin -->", "<!-- full-size-parity:end -->"

# Real configs (the Hub config.json files, see tests/fixtures/configs/README.md); unlisted keys take the class defaults,
# as they do when the Hub files are loaded.
TEXT_ENCODER = {
    "sd21": dict(hidden_act="gelu", hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                 num_hidden_layers=23, projection_dim=512, vocab_size=49408, max_position_embeddings=77,
                 layer_norm_eps=1e-5, attention_dropout=0.0, bos_token_id=0, eos_token_id=2, pad_token_id=1),
    "sd15": dict(hidden_act="quick_gelu", hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                 num_hidden_layers=12, projection_dim=768, vocab_size=49408, max_position_embeddings=77,
                 layer_norm_eps=1e-5, attention_dropout=0.0, bos_token_id=0, eos_token_id=2, pad_token_id=1),
}
UNET_COMMON = dict(act_fn="silu", block_out_channels=[320, 640, 1280, 1280], center_input_sample=False,
                   down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], downsample_padding=1,
                   dual_cross_attention=False, flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
                   mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=32, num_class_embeds=None,
                   only_cross_attention=False, out_channels=4, sample_size=64,
                   up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
UNET = {
    "sd21": dict(UNET_COMMON, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                 use_linear_projection=True),
    "sd15": dict(UNET_COMMON, attention_head_dim=8, cross_attention_dim=768, use_linear_projection=False,
                 upcast_attention=False),
}
VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512], down_block_types=["DownEncoderBlock2D"] * 4,
           in_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32, out_channels=3,
           up_block_types=["UpDecoderBlock2D"] * 4)
CONFIG_NAMES = {"sd21": "SD 2.1-base", "sd15": "SD 1.5"}
# Parameter totals of the real models (docs/models.md); the VAE is shared.
PARAMETERS = {("sd21", "text_encoder"): 340_387_840, ("sd15", "text_encoder"): 123_060_480,
              ("sd21", "unet"): 865_910_724, ("sd15", "unet"): 859_520_964,
              ("sd21", "vae"): 83_653_863, ("sd15", "vae"): 83_653_863}
# Pass if max |sdtrain - truth| <= TOLERANCE * max |truth|, per output (fp32, CPU). The text
# encoder keeps the tiny fixtures' 1e-5 (its fp32 output equals transformers' bitwise). At the
# UNet's and the VAE's full widths the conv/matmul kernels split reductions across threads, so
# the last bits depend on the thread count even for diffusers itself (its VAE decode moves by
# 4e-6 of max between 1 and 2 CPU threads, measured when the opt-in full-size ctest was written);
# 5e-5 leaves room for more threads on other machines while staying far below any real defect
# (the tiny-fixture tests show a wrong activation or eps misses by >100x such a tolerance).
TOLERANCE = {"text_encoder": 1e-5, "unet": 5e-5, "vae": 5e-5}
LONG_PROMPT = ("a very detailed oil painting of a lighthouse on a rocky coast at dusk, dramatic clouds, "
           "crashing waves, warm light in the windows, seagulls, long exposure, trending on artstation, "
           "highly detailed, sharp focus, golden hour, volumetric light, 8k, masterpiece, by a famous painter")
# The empty prompt (classifier-free guidance's negative), a short one, and one the tokenizer
# truncates to 77 tokens (no padding at all).
PROMPTS = ["", "a photo of sks dog", LONG_PROMPT + ", " + LONG_PROMPT]


def tokenize(config_name, scratch: Path):
    """The prompts as the SD pipeline tokenizes them (padding to 77; SD 2 pads with "!" = id 0)."""
    folder = scratch / "tokenizer"
    write_tokenizer_files(folder, BPE)
    pad = "!" if config_name == "sd21" else "<|endoftext|>"
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids[0, 2].item() == (0 if config_name == "sd21" else 49407), ids[0, :4]
    assert ids[2, -1].item() == 49407, "the long prompt should fill all 77 positions"
    return ids


def build(component, config_name, seed, scratch: Path):
    """(model, library, class name, inputs); the model in float32 with random weights."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    if component == "text_encoder":
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**TEXT_ENCODER[config_name]))
        return model, "transformers", "CLIPTextModel", {"input_ids": tokenize(config_name, scratch)}
    if component == "unet":
        model = diffusers.UNet2DConditionModel(**UNET[config_name])
        dim = UNET[config_name]["cross_attention_dim"]
        inputs = {"sample": torch.randn(2, 4, 32, 32, generator=generator),
                  "timestep": torch.tensor([999, 10], dtype=torch.int64),
                  "encoder_hidden_states": torch.randn(2, 77, dim, generator=generator)}
        return model, "diffusers", "UNet2DConditionModel", inputs
    if component == "vae":
        model = diffusers.AutoencoderKL(**VAE)
        inputs = {"x": torch.rand(1, 3, 128, 128, generator=generator) * 2 - 1,
                  "z": torch.randn(1, 4, 16, 16, generator=generator)}
        return model, "diffusers", "AutoencoderKL", inputs
    raise ValueError(component)


def reference_forward(component, model, inputs):
    """The reference's outputs under the names bench_model_forward writes."""
    with torch.inference_mode():
        if component == "text_encoder":
            return {"last_hidden_state": model(input_ids=inputs["input_ids"]).last_hidden_state}
        if component == "unet":
            return {"sample": model(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample}
        posterior = model.encode(inputs["x"]).latent_dist
        return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar,
                "decoded": model.decode(inputs["z"]).sample}


def cast_inputs(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def save_folder(component, model, library, class_name, folder: Path):
    """A diffusers model folder holding one component. The text encoder is written in the Hub
    layout (text_model. prefix), as the real SD folders have it."""
    if folder.exists():
        shutil.rmtree(folder)
    target = folder / component
    if component == "text_encoder":
        model.config.save_pretrained(target)
        tensors = {"text_model." + k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(tensors, target / "model.safetensors", metadata={"format": "pt"})
    else:
        model.save_pretrained(target, safe_serialization=True)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", component: [library, class_name]}, indent=2))


def timed(fn, repeat):
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        result = fn()
    return result, (time.perf_counter() - start) * 1000 / repeat


def max_abs(a, b):
    return (a.double() - b.double()).abs().max().item()


def compare_component(args, config_name, component, label):
    folder = args.scratch / config_name / component
    model, library, class_name, inputs = build(component, config_name, args.seed, args.scratch)
    model.eval()
    ref_parameters = sum(p.numel() for p in model.parameters())
    save_folder(component, model, library, class_name, folder)
    inputs_path = folder / "inputs.safetensors"
    save_file({k: v.contiguous() for k, v in inputs.items()}, inputs_path)

    fp32, ref_ms = timed(lambda: reference_forward(component, model, inputs), args.repeat)
    fp32 = {k: v.clone() for k, v in fp32.items()}
    exact = None
    if args.reference_dtype == "float64":
        model.double()
        exact = {k: v.clone() for k, v in reference_forward(component, model, cast_inputs(inputs, torch.float64)).items()}
    del model
    gc.collect()

    outputs_path = folder / "outputs.safetensors"
    command = [str(args.bench), "--model", str(folder), "--component", component, "--inputs", str(inputs_path),
               "--outputs", str(outputs_path), "--dtype", "float32", "--device", "cpu", "--repeat", str(args.repeat)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    ours = load_file(outputs_path)
    expected = PARAMETERS[(config_name, component)]
    parameters_ok = report["parameters"] == ref_parameters == expected
    print(f"  parameters: sdtrain {report['parameters']:,}, reference {ref_parameters:,}, real model {expected:,}"
          f"{'' if parameters_ok else '  MISMATCH'}", flush=True)

    rows = []
    for name, ref32 in fp32.items():
        truth = exact[name] if exact is not None else ref32
        scale = truth.abs().max().item()
        ours_err = max_abs(ours[name], truth)
        tolerance = TOLERANCE[component]
        rows.append({
            "config": label, "component": component, "output": name,
            "shape": "×".join(str(s) for s in truth.shape), "dtype": "float32", "max_abs": ours_err,
            "max_rel": ours_err / scale, "ref_rel": max_abs(ref32, truth) / scale if exact is not None else None,
            "scale": scale, "ms": report["ms_per_forward"], "ref_ms": ref_ms, "parameters": report["parameters"],
            "parameters_ok": parameters_ok, "tolerance": tolerance,
            "ok": parameters_ok and ours_err <= tolerance * scale})
        print(f"  {name}: max abs {ours_err:.3e}, / scale {ours_err / scale:.3e} (scale {scale:.3g}, "
              f"tolerance {tolerance:.0e}: {'ok' if ours_err <= tolerance * scale else 'FAIL'}); "
              f"ours {report['ms_per_forward']:.1f} ms, reference {ref_ms:.1f} ms", flush=True)
    if not args.keep:
        shutil.rmtree(folder)
    return rows


def machine():
    """CPU model, core count and GPU presence, as nproc / lscpu / torch report them."""
    def run(command):
        try:
            return subprocess.run(command, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""
    model = next((line.split(":", 1)[1].strip() for line in run(["lscpu"]).splitlines()
                  if line.startswith("Model name:")), platform.processor() or platform.machine())
    nproc = run(["nproc"]).strip() or str(os.cpu_count())
    gpu = (f"GPU present ({torch.cuda.get_device_name(0)}) but not used" if torch.cuda.is_available()
           else "no GPU")
    return f"{model}, `nproc` = {nproc}, {gpu}"


def markdown(rows, skipped, args):
    truth = "float64 reference" if args.reference_dtype == "float64" else "float32 reference"
    lines = [
        "Produced by:", "", "```",
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} ~/.cache/sdtrain/venv/bin/python "
        f"tools/full_size_parity.py {' '.join(args.argv)}".rstrip(), "```", "",
        f"Machine: {machine()}; {torch.get_num_threads()} torch threads; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}; "
        f"seed {args.seed}; CPU, float32; ms are the mean of {args.repeat} forward passes after one warm-up. "
        f"Load average (1 min) at start {args.load_start:.1f}, at end {os.getloadavg()[0]:.1f}: timings from a "
        "shared machine are indicative only.", "",
        f"Errors are against the {truth}; scale = max |reference|; max rel. = max abs / scale. "
        "\"ref. fp32 rel.\" is the float32 reference's own error on the same scale: the noise floor. "
        "A row passes if max rel. <= its tolerance and the parameter total equals both the reference "
        "model's and the real model's.", "",
        "| config | component | parameters | output | shape | dtype | max abs error | max rel. error | tolerance | "
        "ref. fp32 rel. | output scale | ms / forward (sdtrain) | ms / forward (reference) | result |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ref_rel = f"{r['ref_rel']:.2e}" if r["ref_rel"] is not None else "n/a"
        result = "pass" if r["ok"] else ("FAIL (parameters)" if not r["parameters_ok"] else "FAIL")
        lines.append(f"| {r['config']} | {r['component']} | {r['parameters']:,} | {r['output']} | {r['shape']} | "
                     f"{r['dtype']} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | {r['tolerance']:.0e} | {ref_rel} | "
                     f"{r['scale']:.3g} | {r['ms']:.1f} | {r['ref_ms']:.1f} | {result} |")
    if skipped:
        lines += ["", "Not compared (bench_model_forward does not support them yet): " + ", ".join(skipped) + "."]
    return "\n".join(lines) + "\n"


def write_doc(path: Path, table: str):
    text = path.read_text() if path.exists() else f"# Parity\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{table}{END}{tail}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, required=True, help="where the model folders go (not the repo)")
    parser.add_argument("--configs", nargs="+", default=["sd21", "sd15"], choices=["sd21", "sd15"])
    parser.add_argument("--components", nargs="+", default=["text_encoder", "unet", "vae"],
                        choices=["text_encoder", "unet", "vae"])
    parser.add_argument("--bench", type=Path, default=REPO / "build/bench/bench_model_forward")
    parser.add_argument("--reference-dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", type=Path, default=REPO / "docs/parity.md")
    parser.add_argument("--keep", action="store_true", help="keep the model folders in --scratch")
    args = parser.parse_args()
    args.argv = [a if not a.startswith(str(REPO)) else os.path.relpath(a, REPO) for a in sys.argv[1:]]
    if args.scratch.resolve().is_relative_to(REPO):
        raise SystemExit("--scratch must be outside the repository")

    args.load_start = os.getloadavg()[0]
    listing = subprocess.run([str(args.bench), "--list"], capture_output=True, text=True, check=True).stdout
    supported = {line.split("\t")[0] for line in listing.splitlines() if line.strip()}
    rows, skipped = [], []
    for config_name in args.configs:
        for component in args.components:
            label = f"{CONFIG_NAMES[config_name]} {component}"
            if component not in supported:
                print(f"skipped {label}: {args.bench.name} does not support it", flush=True)
                skipped.append(label)
                continue
            config_label = CONFIG_NAMES[config_name]
            if component == "vae":  # one VAE config for both: compare it once
                if config_name != args.configs[0]:
                    continue
                config_label = " / ".join(CONFIG_NAMES[c] for c in args.configs)
            print(f"{label}:", flush=True)
            rows += compare_component(args, config_name, component, config_label)
            write_doc(args.doc, markdown(rows, skipped, args))  # so an interrupted run keeps its rows
            gc.collect()
    table = markdown(rows, skipped, args)
    print(table)
    write_doc(args.doc, table)
    failed = [f"{r['config']} {r['component']} {r['output']}" for r in rows if not r["ok"]]
    if failed:
        print("FAILED: " + ", ".join(failed), file=sys.stderr)
        sys.exit(1)
    print(f"all {len(rows)} rows within tolerance")


if __name__ == "__main__":
    main()
