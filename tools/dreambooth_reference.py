#!/usr/bin/env python3
"""Replays an sdtrain run's DreamBooth steps with diffusers' and transformers' models and
torch.optim.AdamW, as train_dreambooth.py performs them, and compares.

Given the model folder the run started from, the run's output_dir (train_config.json and the
final diffusers folder) and the per-micro-batch dump that `sdtrain train --dump-steps DIR`
writes (latents, noise, timesteps and sdtrain's loss), this script:
  * builds the reference UNet2DConditionModel / CLIPTextModel from the same initial weights,
  * runs each micro-batch the way train_dreambooth.py does: DDPMScheduler.add_noise, epsilon or
    get_velocity target, MSE in fp32 (instance and class halves with prior preservation,
    min-SNR weights on the instance half), loss / accumulation steps, backward,
    clip_grad_norm_, AdamW step, LR scheduler step (diffusers.optimization.get_scheduler),
  * and prints a JSON report: both loss sequences and the final weight differences.
Used by tests/train/train_parity_test.cpp; the assertions and tolerances live there.
"""
import argparse
import glob
import json
import os

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTokenizer


def micro_batches(dump_dir):
    for path in sorted(glob.glob(os.path.join(dump_dir, "micro-*.safetensors"))):
        yield load_file(path)


def instance_loss(config, scheduler, prediction, target, timesteps):
    if config.get("snr_gamma") is None:
        return torch.nn.functional.mse_loss(prediction, target, reduction="mean")
    alphas_cumprod = scheduler.alphas_cumprod
    snr = ((alphas_cumprod**0.5)[timesteps] / ((1.0 - alphas_cumprod) ** 0.5)[timesteps]) ** 2
    weights = torch.stack([snr, config["snr_gamma"] * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    weights = weights / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else weights / snr
    loss = torch.nn.functional.mse_loss(prediction, target, reduction="none")
    return (loss.mean(dim=list(range(1, loss.dim()))) * weights).mean()


def peft_key(component, name):
    """sdtrain's key of a peft LoRA parameter: no adapter name, the text encoder under text_model."""
    name = name.replace(".default", "")
    if component == "text_encoder" and not name.startswith("text_model."):
        name = "text_model." + name  # transformers 5's CLIPTextModel has no text_model module
    return f"{component}.{name}"


def add_lora_adapters(config, unet, text_encoder, train_text, dump):
    """train_dreambooth_lora.py's adapters (peft LoraConfig, gaussian init), starting from the
    values sdtrain drew (the dump's adapters-start.safetensors), so both runs start equal."""
    from peft import LoraConfig

    alpha = config["lora_alpha"] if config["lora_alpha"] is not None else config["lora_rank"]
    unet.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config["lora_rank"], lora_alpha=alpha, init_lora_weights="gaussian",
                                lora_dropout=config["lora_dropout"],
                                target_modules=config["lora_unet_targets"]))
    if train_text:
        text_encoder.add_adapter(LoraConfig(r=config["lora_rank"], lora_alpha=alpha, init_lora_weights="gaussian",
                                            lora_dropout=config["lora_dropout"],
                                            target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    start = load_file(os.path.join(dump, "adapters-start.safetensors"))
    used = 0
    with torch.no_grad():
        for component, model in (("unet", unet), ("text_encoder", text_encoder)):
            for name, param in model.named_parameters():
                if "lora_" in name:
                    param.copy_(start[peft_key(component, name)])
                    param.requires_grad_(True)
                    used += 1
    if used != len(start):
        raise SystemExit(f"the dump has {len(start)} adapter tensors, peft made {used}")


def compare_adapters(output, unet, text_encoder, train_text, initial, initial_text, lr):
    """The written pytorch_lora_weights.safetensors against the reference's trained adapters."""
    written = load_file(os.path.join(output, "pytorch_lora_weights.safetensors"))
    report = {}
    for component, model, start in (("unet", unet, initial), ("text_encoder", text_encoder, initial_text)):
        if component == "text_encoder" and not train_text:
            continue
        diff_sq, update_sq, count, max_update = 0.0, 0.0, 0, 0.0
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            count += 1
            ours = written[peft_key(component, name)].float()
            update = param.detach() - start[name]
            diff_sq += (ours - param.detach()).double().pow(2).sum().item()
            update_sq += update.double().pow(2).sum().item()
            max_update = max(max_update, update.abs().max().item())
        report[component] = {"tensors_compared": count, "max_abs_update": max_update,
                             "relative_l2_diff": (diff_sq / update_sq) ** 0.5 if update_sq > 0 else 0.0,
                             "tensors_written": sum(k.startswith(component + ".") for k in written),
                             "tensors_expected": count}
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="the base model folder")
    parser.add_argument("--output", required=True, help="the sdtrain run's output_dir")
    parser.add_argument("--dump", required=True, help="the --dump-steps folder")
    parser.add_argument("--total-steps", type=int, required=True)
    args = parser.parse_args()

    torch.manual_seed(0)
    with open(os.path.join(args.output, "train_config.json")) as f:
        config = json.load(f)
    unet = UNet2DConditionModel.from_pretrained(args.model, subfolder="unet").float()
    text_encoder = CLIPTextModel.from_pretrained(args.model, subfolder="text_encoder").float()
    tokenizer = CLIPTokenizer.from_pretrained(args.model, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(args.model, subfolder="scheduler")
    train_text = config["train_text_encoder"]
    lora = config.get("train_mode", "full") == "lora"
    unet.train()
    text_encoder.train(train_text)
    text_encoder.requires_grad_(train_text)
    if lora:
        add_lora_adapters(config, unet, text_encoder, train_text, args.dump)
    initial = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    initial_text = {k: v.detach().clone() for k, v in text_encoder.state_dict().items()}

    if lora:
        params = [p for p in unet.parameters() if p.requires_grad] + \
            ([p for p in text_encoder.parameters() if p.requires_grad] if train_text else [])
    else:
        params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    lr = config["learning_rate"]
    if config["scale_lr"]:
        lr *= config["gradient_accumulation_steps"] * config["train_batch_size"]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(config["adam_beta1"], config["adam_beta2"]),
                                  weight_decay=config["adam_weight_decay"], eps=config["adam_epsilon"])
    lr_scheduler = get_scheduler(config["lr_scheduler"], optimizer=optimizer,
                                 num_warmup_steps=config["lr_warmup_steps"], num_training_steps=args.total_steps,
                                 num_cycles=config["lr_num_cycles"], power=config["lr_power"])

    def ids(prompt):
        return tokenizer(prompt, padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                         return_tensors="pt").input_ids

    prior = config["with_prior_preservation"]
    ours, reference, lrs = [], [], []
    for batch in micro_batches(args.dump):
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        size = latents.shape[0] // 2 if prior else latents.shape[0]
        input_ids = torch.cat([ids(config["instance_prompt"])] * size +
                              ([ids(config["class_prompt"])] * size if prior else []))
        with torch.set_grad_enabled(train_text):
            encoder_hidden_states = text_encoder(input_ids)[0]
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
        if prior:
            prediction, prediction_prior = torch.chunk(prediction, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            loss = instance_loss(config, scheduler, prediction.float(), target.float(), torch.chunk(timesteps, 2)[0])
            loss = loss + config["prior_loss_weight"] * torch.nn.functional.mse_loss(
                prediction_prior.float(), target_prior.float(), reduction="mean")
        else:
            loss = instance_loss(config, scheduler, prediction.float(), target.float(), timesteps)
        (loss / config["gradient_accumulation_steps"]).backward()
        ours.append(float(batch["loss"][0]))
        reference.append(loss.item())
        if int(batch["sync"][0]):
            torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"])
            lrs.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()

    report = {"micro_batches": len(ours), "losses": ours, "reference_losses": reference, "lrs": lrs}
    if lora:
        report.update(compare_adapters(args.output, unet, text_encoder, train_text, initial, initial_text, lr))
        print(json.dumps(report))
        return
    trained = {"unet": (unet, "unet/diffusion_pytorch_model.safetensors")}
    if train_text:
        trained["text_encoder"] = (text_encoder, "text_encoder/model.safetensors")
    for name, (model, file) in trained.items():
        written = load_file(os.path.join(args.output, file))
        expected = model.state_dict()
        if name == "text_encoder" and not any(k.startswith("text_model.") for k in expected):
            # sdtrain writes the Hub layout (text_model. prefix); transformers 5 names the
            # module's own keys without it.
            written = {k.removeprefix("text_model."): v for k, v in written.items()}
        # Adam normalises each element's step, so an element whose gradient is round-off
        # (|g| near 0, sign undetermined) may move by up to lr in either direction on each
        # side: the comparison reports the distribution, not only the maximum.
        max_diff, diff_sq, update_sq, max_update, count, elements, far = 0.0, 0.0, 0.0, 0.0, 0, 0, 0
        start = initial if name == "unet" else initial_text
        for key, value in model.state_dict().items():
            if key not in written:
                continue
            count += 1
            diff = (written[key].float() - value).abs()
            update = value - start[key]
            max_diff = max(max_diff, diff.max().item())
            max_update = max(max_update, update.abs().max().item())
            diff_sq += diff.double().pow(2).sum().item()
            update_sq += update.double().pow(2).sum().item()
            elements += diff.numel()
            far += (diff > 1e-2 * lr).sum().item()
        report[name] = {"tensors_compared": count, "max_abs_diff": max_diff, "max_abs_update": max_update,
                        "relative_l2_diff": (diff_sq / update_sq) ** 0.5 if update_sq > 0 else 0.0,
                        "fraction_beyond_1pct_of_lr": far / max(elements, 1),
                        "tensors_written": len(written), "tensors_expected": len(model.state_dict())}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
