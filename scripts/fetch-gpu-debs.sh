#!/usr/bin/env bash
# Run here (Debian, apt reachable): downloads the Debian packages the build needs that the GPU
# machine lacks (it has python3 with torch, nvcc, cmake and ninja but no apt and no network)
# into .deb/ (git-ignored), which the device tool carries. See docs/gpu.md.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
mkdir -p "$root/.deb"
cd "$root/.deb"
packages=(nlohmann-json3-dev libstb-dev libstb0 libcli11-dev libspdlog-dev libspdlog1.10 libfmt-dev libfmt9
          libgtest-dev libicu-dev libicu72 libxxhash-dev libyaml-cpp-dev libyaml-cpp0.7 ccache)
apt-get download "${packages[@]}"
ls -la
