# shellcheck shell=bash
# Sourced by the scripts: where the Python environment, LibTorch and the build live.
#   SDTRAIN_VENV   Python environment with the pinned torch wheel and reference tools
#   Torch_DIR      use another LibTorch (its share/cmake/Torch folder) instead of the wheel's
#   SDTRAIN_BUILD  build directory (default: build/ in the repository)
SDTRAIN_VENV="${SDTRAIN_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/sdtrain/venv}"
SDTRAIN_BUILD="${SDTRAIN_BUILD:-$root/build}"
export SDTRAIN_VENV SDTRAIN_BUILD
