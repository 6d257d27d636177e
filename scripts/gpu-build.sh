#!/usr/bin/env bash
# Run on the GPU machine, from the repository root, after scripts/fetch-gpu-debs.sh filled .deb/
# here and .deb/ was carried over. Unpacks the packages into .deb/root (never into /), builds
# with the machine's own torch (python3) and CUDA, and runs ctest, GPU tests included.
#   scripts/gpu-build.sh [ctest arguments...]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="$root/.deb/root"
if [[ ! -d "$prefix/usr" ]]; then
  for deb in "$root"/.deb/*.deb; do dpkg -x "$deb" "$prefix"; done
fi
export PATH="$prefix/usr/bin:$PATH"
export LD_LIBRARY_PATH="$prefix/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
torch_prefix="$(python3 -c 'import torch; print(torch.utils.cmake_prefix_path)')"
build="${SDTRAIN_BUILD:-$root/build-gpu}"
cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_PREFIX_PATH="$torch_prefix;$prefix/usr" -DICU_ROOT="$prefix/usr" \
  -DSDTRAIN_PYTHON="$(command -v python3)" -DSDTRAIN_CUDA_ARCHITECTURES="${SDTRAIN_CUDA_ARCHITECTURES:-90}"
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j 4 "$@"
