#!/usr/bin/env bash
# Builds sdtrain and runs the bundled demo on the CPU: DreamBooth training of a tiny random
# model on four sample photos (class images generated first), then `sdtrain generate` with the
# result. Takes about a minute after the build; re-running starts the demo afresh.
# Extra arguments go to the training command, e.g. --set max_steps=100.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
source "$root/scripts/env.sh"
cd "$root"
"$SDTRAIN_BUILD/sdtrain" --config configs/demo.json --overwrite "$@"
"$SDTRAIN_BUILD/sdtrain" generate --model out/demo --prompt "a photo of sks robot" --steps 10 \
  --width 64 --height 64 --num-images 4 --batch-size 4 --grid --out out/demo/generated
echo "demo done: model in out/demo, validation grids in out/demo/samples, images in out/demo/generated"
