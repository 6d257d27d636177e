#!/usr/bin/env bash
# Builds sdtrain and runs the whole test suite (ctest). The one command CI runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
source "$root/scripts/env.sh"
ctest --test-dir "$SDTRAIN_BUILD" --output-on-failure -j "$(nproc)" "$@"
