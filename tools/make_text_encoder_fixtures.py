"""Writes the CLIPTextModel parity fixtures under tests/fixtures/models/ (transformers, fixed seed).

Three tiny model folders, each loadable by sdtrain's ModelFolder and by transformers:
  clip_text_sd2_tiny/         gelu, the bundled demo model's text encoder config (SD 2.x-like);
                              weights written by this transformers version's save_pretrained, which
                              (transformers >= 5) leaves out the `text_model.` key prefix.
  clip_text_sd15_tiny/        quick_gelu, 3 layers (SD 1.5-like); weights in the Hub layout
                              (`text_model.` prefix), as transformers 4 wrote them.
  clip_text_sd15_tiny_legacy/ the same weights plus the legacy `text_model.embeddings.position_ids`
                              buffer that files written before transformers 4.31 carry.
Each of the first two has reference.safetensors: input ids with the SD 2.x ("!" = id 0) and
SD 1.5 (<|endoftext|>) padding patterns, last_hidden_state, the clip_skip outputs the SD pipeline
computes (final_layer_norm(hidden_states[-(k+1)])), and the gradient of a fixed scalar loss
sum(last_hidden_state * loss_weight) w.r.t. every parameter (keys grad.<module key>).

All weights are perturbed after initialisation (layer norms away from 1/0, biases nonzero), so a
swapped or ignored tensor changes the outputs. References are computed in float64 with the SDPA
attention path and stored as float32: the fixtures hold the exact result for the stored fp32
weights, not one fp32 implementation's rounding (the script checks the eager float64 path agrees
and prints the fp32 reference's own error, which the C++ tolerances are set against).

    ~/.cache/sdtrain/venv/bin/python tools/make_text_encoder_fixtures.py
"""
import argparse
import copy
import json
import shutil
from pathlib import Path

import numpy
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "tests/fixtures/models"
SEED = 1234
LENGTH = 77


def versions():
    return {"generator": "tools/make_text_encoder_fixtures.py", "seed": str(SEED),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "numpy": numpy.__version__}


def sd2_config():
    # The bundled demo model's text encoder: hidden 32, 2 layers, 4 heads, gelu, vocab 1514.
    return CLIPTextConfig.from_pretrained(REPO / "configs/demo/model/text_encoder")


def sd15_config():
    # SD 1.5's architecture (quick_gelu) at a tiny size; 3 layers so clip_skip 1 and 2 both
    # leave layers to run; vocab kept small because the fixtures are committed.
    return CLIPTextConfig(vocab_size=256, hidden_size=24, intermediate_size=48, num_hidden_layers=3,
                          num_attention_heads=3, max_position_embeddings=LENGTH, hidden_act="quick_gelu",
                          layer_norm_eps=1e-5, projection_dim=24, bos_token_id=254, eos_token_id=255)


def clone(model, attention):
    copy_ = CLIPTextModel(copy.deepcopy(model.config)).eval()
    copy_.load_state_dict(model.state_dict())
    copy_.set_attn_implementation(attention)
    return copy_


def build(config, generator):
    model = CLIPTextModel(config).eval()
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or \
                    name.endswith("final_layer_norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
            elif name.endswith("embedding.weight"):
                # CLIP's own init (std 0.02) keeps activations small, so the layer norm eps matters.
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return model


def padded_ids(config, lengths, pad_id, generator):
    """Rows [bos, t_1..t_n, eos, pad...] as CLIPTokenizer(padding="max_length") gives them."""
    bos, eos = config.vocab_size - 2, config.vocab_size - 1
    rows = []
    for n in lengths:
        tokens = torch.randint(0, config.vocab_size - 2, (n,), generator=generator).tolist()
        row = [bos] + tokens + [eos]
        rows.append(row + [pad_id] * (LENGTH - len(row)))
    return torch.tensor(rows, dtype=torch.int64)


def run(model, ids, clip_skips):
    out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1  # embeddings, then every layer
    results = {"last_hidden_state": out.last_hidden_state}
    for k in clip_skips:  # pipeline_stable_diffusion.py encode_prompt with clip_skip=k
        results[f"clip_skip{k}"] = model.final_layer_norm(hidden[-(k + 1)])
    return results


def hub_state_dict(model):
    return {"text_model." + k: v.detach().contiguous() for k, v in model.state_dict().items()}


def write_folder(folder: Path, model, layout: str, legacy_position_ids=False):
    if folder.exists():
        shutil.rmtree(folder)
    component = folder / "text_encoder"
    if layout == "save_pretrained":
        model.save_pretrained(component, safe_serialization=True)
    else:
        model.config.save_pretrained(component)
        tensors = hub_state_dict(model)
        if legacy_position_ids:
            tensors["text_model.embeddings.position_ids"] = torch.arange(LENGTH, dtype=torch.int64)[None]
        save_file(tensors, component / "model.safetensors", metadata={"format": "pt"})
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}, indent=2))


def check_reload(folder: Path, model, ids):
    """transformers itself must read the folder back to the same model (validates the layouts)."""
    reloaded = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state), folder


def make_reference(name, model, inputs, grad_input, clip_skips, generator, extra_metadata):
    """inputs: {case: ids}; outputs from a float64 copy; gradients of sum(out * loss_weight)."""
    exact = clone(model, "sdpa").double()
    eager = clone(model, "eager").double()

    tensors = {}
    report = {}
    for case, ids in inputs.items():
        tensors[f"input_ids.{case}"] = ids
        with torch.no_grad():
            ref = run(exact, ids, clip_skips)
            ref_eager = run(eager, ids, clip_skips)
            fp32 = run(model, ids, clip_skips)
        for key, value in ref.items():
            # The eager path's softmax runs in float32 even for float64 inputs; it must still agree.
            assert (ref_eager[key] - value).abs().max() < 1e-6, (case, key)
            tensors[f"{key}.{case}"] = value.float().contiguous()
            err = ((fp32[key].double() - value).abs().max() / value.abs().max()).item()
            report[f"{key}.{case}"] = err

    ids = inputs[grad_input]
    loss_weight = torch.randn(ids.shape + (model.config.hidden_size,), generator=generator)
    tensors["loss_weight"] = loss_weight
    exact.zero_grad()
    loss = (exact(input_ids=ids).last_hidden_state * loss_weight.double()).sum()
    loss.backward()
    tensors["loss"] = loss.detach().float().reshape(1)
    model.zero_grad()
    (model(input_ids=ids).last_hidden_state * loss_weight).sum().backward()
    # Error scale per tensor: its largest entry, floored at 1% of the largest entry of any
    # gradient. Some gradients are exactly zero in exact arithmetic (the key biases: softmax
    # ignores a constant added to every key), so only rounding noise is left to compare there.
    fp32_grads = dict(model.named_parameters())
    floor = 0.01 * max(p.grad.abs().max().item() for p in exact.parameters())
    grad_report = 0.0
    for key, p in exact.named_parameters():
        tensors[f"grad.text_model.{key}"] = p.grad.float().contiguous()
        scale = max(p.grad.abs().max().item(), floor)
        grad_report = max(grad_report, (fp32_grads[key].grad.double() - p.grad).abs().max().item() / scale)
    metadata = {**versions(), **extra_metadata, "grad_input": f"input_ids.{grad_input}",
                "reference": "float64, sdpa attention; stored as float32"}
    save_file(tensors, OUT / name / "reference.safetensors", metadata=metadata)
    worst = max(report.values())
    print(f"{name}: fp32 transformers vs float64: outputs max |err|/max|ref| = {worst:.2e}, "
          f"gradients (per tensor, worst) = {grad_report:.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    OUT.mkdir(parents=True, exist_ok=True)

    # SD 2.x: "!" (id 0) pads after <|endoftext|>. Rows: the empty prompt (CFG's negative), a
    # short prompt, a prompt filling all 75 slots. Plus an unpadded 16-token batch (L < 77).
    config = sd2_config()
    model = build(config, generator)
    sd2_ids = padded_ids(config, [0, 7, 75], pad_id=0, generator=generator)
    short = torch.randint(0, config.vocab_size, (2, 16), generator=generator)
    write_folder(OUT / "clip_text_sd2_tiny", model, layout="save_pretrained")
    check_reload(OUT / "clip_text_sd2_tiny", model, sd2_ids)
    make_reference("clip_text_sd2_tiny", model, {"sd2_padding": sd2_ids, "short": short}, "sd2_padding",
                   clip_skips=[1], generator=generator, extra_metadata={"layout": "save_pretrained (no prefix)"})

    # SD 1.5: <|endoftext|> pads.
    config = sd15_config()
    model = build(config, generator)
    sd15_ids = padded_ids(config, [0, 7, 75], pad_id=config.vocab_size - 1, generator=generator)
    write_folder(OUT / "clip_text_sd15_tiny", model, layout="hub")
    check_reload(OUT / "clip_text_sd15_tiny", model, sd15_ids)
    make_reference("clip_text_sd15_tiny", model, {"sd15_padding": sd15_ids}, "sd15_padding",
                   clip_skips=[1, 2], generator=generator, extra_metadata={"layout": "hub (text_model. prefix)"})
    write_folder(OUT / "clip_text_sd15_tiny_legacy", model, layout="hub", legacy_position_ids=True)
    check_reload(OUT / "clip_text_sd15_tiny_legacy", model, sd15_ids)

    total = sum(f.stat().st_size for f in OUT.glob("clip_text_*/**/*") if f.is_file())
    print(f"wrote {OUT.relative_to(REPO)}/clip_text_*: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
