#!/usr/bin/env bash
# Installs what sdtrain needs to build and test, skipping whatever is already present, so it
# is safe to run any number of times:
#   - Debian packages (headers, build tools), via apt-get when one is missing;
#   - a Python environment outside the repository (default ~/.cache/sdtrain/venv, override with
#     SDTRAIN_VENV) holding the pinned LibTorch wheel and the reference tools of tools/requirements.txt.
# Prints nothing but progress; the build scripts source scripts/env.sh afterwards.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"

debian_packages=(cmake ninja-build ccache g++ clang libclang-rt-14-dev pkg-config python3 python3-venv
                 nlohmann-json3-dev libstb-dev libcli11-dev libspdlog-dev libgtest-dev
                 libicu-dev libxxhash-dev libyaml-cpp-dev)
missing=()
for package in "${debian_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}"
  sudo_cmd=(); [[ $(id -u) -eq 0 ]] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

requirements="$root/tools/requirements.txt"
stamp="$SDTRAIN_VENV/.sdtrain-requirements"
if [[ ! -x "$SDTRAIN_VENV/bin/python" ]]; then
  echo "setup: creating the Python environment at $SDTRAIN_VENV"
  python3 -m venv "$SDTRAIN_VENV"
fi
if ! cmp -s "$requirements" "$stamp"; then
  echo "setup: installing tools/requirements.txt into $SDTRAIN_VENV (LibTorch wheel is ~1 GB)"
  "$SDTRAIN_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$stamp"
fi
