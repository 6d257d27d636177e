#!/usr/bin/env bash
# Run here, after scripts/build.sh: packs what one GPU session needs into .gl/ and .whl/
# (git-ignored; the device tool carries them, `carry: [".gl", ".whl"]`, about 20 MiB; the
# script fails if they and the working tree pass the tool's 64 MiB):
#   .gl/bin.tar.xz  stripped sdtrain, test_train, test_optim, test_models, bench_group_norm_silu
#                   and bench_model_load (+ sdtrain_baseline when given), unpacked there
#                   into .gl/bin/
#   .gl/libs.tar.xz the Debian shared libraries they link that the GPU machine lacks
#   .whl/           the diffusers wheel (the GPU machine has torch and transformers only), and
#                   diffusers' train_dreambooth.py / train_dreambooth_lora.py when DIFFUSERS_GIT
#                   names a diffusers git directory (e.g. a mirror), for the side-by-side runs
# Then, on the GPU machine: scripts/gpu-session.sh. See docs/gpu.md.
#   scripts/gpu-pack.sh [BASELINE_SDTRAIN]   e.g. an sdtrain built from the previous commit
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
rm -rf .gl/bin .gl/lib && mkdir -p .gl/bin .gl/lib .whl
strip -o .gl/bin/sdtrain "$SDTRAIN_BUILD/sdtrain"
for t in test_train test_optim test_models; do strip -o ".gl/bin/$t" "$SDTRAIN_BUILD/tests/$t"; done
for b in bench_group_norm_silu bench_model_load; do strip -o ".gl/bin/$b" "$SDTRAIN_BUILD/bench/$b"; done
if (($#)); then strip -o .gl/bin/sdtrain_baseline "$1"; fi
# The Debian libraries they link (from /lib or /usr/lib), except glibc and the GCC runtime,
# which the machine has; torch, CUDA and NCCL come from its own Python environment.
for lib in $(ldd .gl/bin/* | awk '/=> \/(usr\/)?lib\// {print $3}' | sort -u); do
  case "$(basename "$lib")" in
    libc.so*|libm.so*|libdl.so*|librt.so*|libpthread.so*|libutil.so*|libstdc++*|libgcc_s*|ld-linux*) ;;
    *) cp -L "$lib" .gl/lib/ ;;
  esac
done
# xz -9: the binaries share the statically linked core, which its 64 MiB dictionary finds
# again (about 50 MB of stripped binaries pack into about 4).
XZ_OPT=-9 tar cJf .gl/libs.tar.xz -C .gl lib && rm -rf .gl/lib
XZ_OPT=-9 tar cJf .gl/bin.tar.xz -C .gl bin && rm -rf .gl/bin
ls .whl/diffusers-*.whl >/dev/null 2>&1 || "$SDTRAIN_VENV/bin/pip" download -q --no-deps diffusers==0.42.1 -d .whl
if [[ -n "${DIFFUSERS_GIT:-}" ]]; then
  for script in train_dreambooth.py train_dreambooth_lora.py; do
    git --git-dir="$DIFFUSERS_GIT" show "HEAD:examples/dreambooth/$script" > ".whl/$script"
  done
fi
# The commit the binaries were built from, for the benchmarks' tables (no .git travels).
echo "$(git rev-parse --short HEAD)$([[ -n "$(git status --porcelain)" ]] && echo -dirty)" > .gl/commit
du -sh .gl/bin.tar.xz .gl/libs.tar.xz .whl
# The device tool refuses a call whose working tree (tracked and untracked-not-ignored files,
# plus the carried paths) passes 64 MiB: say so here, before any device time is spent.
tree=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
carried=$(du -sb .gl .whl | awk '{s+=$1} END {print s}')
echo "travels: $(( (tree + carried) / 1048576 )) MiB of 64 (tree $((tree / 1048576)), .gl and .whl $((carried / 1048576)))"
if (( tree + carried > 64 * 1048576 )); then
  echo "gpu-pack: over the device tool's 64 MiB; carry less" >&2
  exit 1
fi
