#!/usr/bin/env bash
# Configures and builds sdtrain (and its tests) into build/. Runs setup.sh first.
# Extra arguments are passed to CMake's configure step, e.g. -DSDTRAIN_CUDA=OFF.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
source "$root/scripts/env.sh"

python="$SDTRAIN_VENV/bin/python"
torch_args=()
if [[ -z "${Torch_DIR:-}" ]]; then
  torch_args=(-DCMAKE_PREFIX_PATH="$("$python" -c 'import torch; print(torch.utils.cmake_prefix_path)')")
else
  torch_args=(-DTorch_DIR="$Torch_DIR")
fi
if [[ ! -f "$SDTRAIN_BUILD/CMakeCache.txt" ]] || (($#)); then
  cmake -S "$root" -B "$SDTRAIN_BUILD" -G Ninja "${torch_args[@]}" -DSDTRAIN_PYTHON="$python" "$@"
fi
cmake --build "$SDTRAIN_BUILD"
