#!/usr/bin/env bash
# Builds the safetensors header fuzzer with clang (libFuzzer + AddressSanitizer + UBSan) and
# runs it for a bounded time from a seed corpus of valid and malformed headers.
# Usage: run_fuzzer.sh SOURCE_DIR WORK_DIR SECONDS
set -euo pipefail
source_dir=$1 work=$2 seconds=$3
mkdir -p "$work/corpus"
clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$source_dir/include" "$source_dir/src/io/safetensors_header.cpp" "$source_dir/src/util/text.cpp" \
  "$source_dir/tests/fuzz/safetensors_header_fuzz.cpp" -o "$work/safetensors_header_fuzz"
# Seeds: the first kilobytes of real files written by diffusers/transformers.
for f in "$source_dir"/configs/demo/model/*/*.safetensors; do
  head -c 4096 "$f" > "$work/corpus/$(basename "$(dirname "$f")").seed"
done
"$work/safetensors_header_fuzz" -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=8192 \
  -print_final_stats=1 "$work/corpus"
