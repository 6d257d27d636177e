#!/usr/bin/env bash
# Builds sdtrain and runs the bundled demo on the CPU: DreamBooth training of a tiny random
# model on four sample photos (class images generated first), then `sdtrain generate` with the
# result. Takes about a minute after the build; re-running starts the demo afresh.
#   scripts/demo.sh          full fine-tuning (configs/demo.json): a diffusers folder in out/demo
#   scripts/demo.sh --lora   LoRA adapters on UNet and text encoder (configs/demo-lora.json):
#                            adapter files in out/demo-lora, generated onto the base with --lora
# Other arguments go to the training command, e.g. --set max_steps=100.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
lora=0
args=()
for arg in "$@"; do
  if [[ "$arg" == "--lora" ]]; then lora=1; else args+=("$arg"); fi
done
"$root/scripts/build.sh"
source "$root/scripts/env.sh"
cd "$root"
if [[ $lora == 1 ]]; then
  "$SDTRAIN_BUILD/sdtrain" --config configs/demo-lora.json --overwrite "${args[@]}"
  "$SDTRAIN_BUILD/sdtrain" generate --model configs/demo/model \
    --lora out/demo-lora/pytorch_lora_weights.safetensors --prompt "a photo of sks robot" --steps 10 \
    --width 64 --height 64 --num-images 4 --batch-size 4 --grid --out out/demo-lora/generated
  echo "demo done: adapters in out/demo-lora (pytorch_lora_weights.safetensors, lora_kohya.safetensors)," \
    "validation grids in out/demo-lora/samples, images in out/demo-lora/generated"
  exit 0
fi
"$SDTRAIN_BUILD/sdtrain" --config configs/demo.json --overwrite "${args[@]}"
"$SDTRAIN_BUILD/sdtrain" generate --model out/demo --prompt "a photo of sks robot" --steps 10 \
  --width 64 --height 64 --num-images 4 --batch-size 4 --grid --out out/demo/generated
echo "demo done: model in out/demo, validation grids in out/demo/samples, images in out/demo/generated"
