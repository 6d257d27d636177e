"""Prints, as JSON, the tensor count and parameter total of each model component of a diffusers
folder, as diffusers/transformers load it (the reference for `sdtrain inspect`)."""
import json
import sys

from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
counts = {}
for name in ("unet", "vae", "text_encoder"):
    state = getattr(pipe, name).state_dict()
    counts[name] = {"tensors": len(state), "parameters": sum(t.numel() for t in state.values())}
print(json.dumps(counts))
