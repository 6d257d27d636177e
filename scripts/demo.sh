#!/usr/bin/env bash
# Builds sdtrain and runs it on the bundled demo: a tiny model and sample images (CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh"
source "$root/scripts/env.sh"
cd "$root"
exec "$SDTRAIN_BUILD/sdtrain" --config configs/demo.json --dry-run "$@"
