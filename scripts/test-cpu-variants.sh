#!/usr/bin/env bash
# Runs the test suite once per CPU capability ATen can dispatch to on this machine
# (ATEN_CPU_CAPABILITY=default, avx2 and, where the CPU has AVX-512, avx512), so a comparison
# that only holds with one vector unit's rounding shows up before a user on another CPU finds
# it. Extra arguments go to ctest, e.g. `-L schedulers` (each tests/<area>/ is a label) or
# `-R Parity`. Prints one summary line per capability; exits non-zero if any run failed.
# CI runs scripts/test.sh only; docs/parity.md records this script's last results.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/build.sh" || exit 1
source "$root/scripts/env.sh"

flags="$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)"
has() { [[ " $flags " == *" $1 "* ]]; }
capabilities=(default)
has avx2 && has fma && capabilities+=(avx2)
# ATen's AVX-512 kernels need the F, BW, VL and DQ subsets.
has avx512f && has avx512bw && has avx512vl && has avx512dq && capabilities+=(avx512)

status=0
summary=()
for capability in "${capabilities[@]}"; do
  log="$SDTRAIN_BUILD/test-cpu-$capability.log"
  echo "== ATEN_CPU_CAPABILITY=$capability (log: $log)"
  ATEN_CPU_CAPABILITY=$capability ctest --test-dir "$SDTRAIN_BUILD" --output-on-failure -j "$(nproc)" "$@" \
    >"$log" 2>&1
  code=$?
  ((code == 0)) || status=1
  summary+=("$capability: $(grep -E 'tests passed|tests failed' "$log" | tail -1) (exit $code)")
  grep -E '^\s+[0-9]+ - .*\((Failed|SEGFAULT|Timeout|Not Run|Exception)' "$log" || true
done
printf '%s\n' "${summary[@]}"
exit $status
