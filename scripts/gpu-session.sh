#!/usr/bin/env bash
# Run on the GPU machine from the repository root, with .gl/ and .whl/ from scripts/gpu-pack.sh
# carried over: no build there. Brings back through $OUT (default /tmp/gpu-session) its log,
# results.tar.xz with every file below, and the tables benchmark.md and sampling.md:
#   1. the GPU tests (CUDA kernels, the loss under sync debug mode, captured and fused training)
#      and the TrainedSet tests;
#   2. the demo on the GPU (fp16, text encoder, min-SNR, offset noise), twice, and once with
#      .gl/bin/sdtrain_baseline when packed: the hashes say whether the GPU run is
#      deterministic and bit-identical to the baseline;
#   3. a random-weight SD 2.1-base (tools/make_full_size_model.py) trained at 512, batch 1 +
#      prior preservation, fp16, 8-bit AdamW, gradient checkpointing: s/step and peak memory
#      from logs/metrics.jsonl, alternating the binaries twice;
#   4. the same run profiled over steps 31-35 (SDTRAIN_PROFILE), with and without gradient
#      checkpointing, tabulated by tools/summarize_trace.py.
#   5. LoRA (issue 13): the same run as LoRA, rank 4, UNet + text-encoder adapters, fp16, AdamW,
#      with and without gradient checkpointing, and diffusers' train_dreambooth_lora.py with the
#      same settings when .whl/train_dreambooth_lora.py was packed (timed by
#      tools/time_training_script.py): median s/step and peak allocated memory of each.
#   6. bench (issues 15, 16): bench_group_norm_silu, alone and --with-conv
#      (group_norm_silu.jsonl), then
#      tools/benchmark.py, every row beside train_dreambooth.py when .whl/train_dreambooth.py was
#      packed; the table in benchmark.md, ready for docs/benchmarks.md.
#   7. sampling (issue 16): tools/benchmark_sampling.py, images/s of `sdtrain generate` and of
#      class-image generation beside diffusers' StableDiffusionPipeline; sampling.md;
#      then bench_model_load of the three components to the GPU in fp16, the direct copy against
#      the staging ring, then one after another against at once, twice each
#      (model_load.jsonl).
# Arguments pick sections: tests demo timing profile lora bench sampling (default: the first
# four). See docs/gpu.md.
set -uo pipefail
R="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; O="${OUT:-/tmp/gpu-session}"; mkdir -p "$O"
# Files are written under $W; $OUT gets session.log, results.tar.xz (every log, JSON line and
# table of $W) and the two tables. The device tool brings back at most 8 files from $OUT, two
# folders down, so the many logs travel as one archive, remade after each section: a time-out
# keeps what the sections before it wrote.
W=/tmp/gpu-work; mkdir -p "$W"
collect() {
  (cd "$W" && find . -type f \( -name '*.log' -o -name '*.jsonl' -o -name '*.md' -o -name '*.json' \) \
    -size -8M -print0 | tar cJf "$O/results.tar.xz" --null -T -)
  [ -f "$W/bench/benchmark.md" ] && cp "$W/bench/benchmark.md" "$O/benchmark.md"
  [ -f "$W/sampling/sampling.md" ] && cp "$W/sampling/sampling.md" "$O/sampling.md"
  return 0
}
exec > >(tee "$O/session.log") 2>&1
date; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
mkdir -p "$R/.gl/x" && tar xJf "$R/.gl/libs.tar.xz" -C "$R/.gl/x"
[ -f "$R/.gl/bin.tar.xz" ] && tar xJf "$R/.gl/bin.tar.xz" -C "$R/.gl"
[ -f "$R/.gl/commit" ] && export SDTRAIN_COMMIT="$(cat "$R/.gl/commit")" && echo "sdtrain $SDTRAIN_COMMIT"
SP=$(python3 -c 'import torch,os;print(os.path.dirname(os.path.dirname(torch.__file__)))')
LP="$R/.gl/x/lib:$SP/torch/lib"; for d in "$SP"/nvidia/*/lib; do LP="$LP:$d"; done
export LD_LIBRARY_PATH="$LP"
B="$R/.gl/bin"; ldd "$B/sdtrain" | grep "not found"
# The test binaries were built with the source tree at /work/main and the build in build/.
mkdir -p /work; [ -e /work/main ] || ln -s "$R" /work/main
mkdir -p "$R/build" && cp "$B/sdtrain" "$R/build/sdtrain"
binaries=(sdtrain); [ -x "$B/sdtrain_baseline" ] && binaries+=(sdtrain_baseline)
median() {  # file: median, p25 and peak memory of the steps after the first 10
  python3 -c "import json,sys;r=[json.loads(l) for l in open(sys.argv[1])];s=sorted(x['seconds'] for x in r[10:]);print('median %.4f s  p25 %.4f s  peak %.2f GiB'%(s[len(s)//2],s[len(s)//4],max(x['peak_memory_bytes'] for x in r)/2**30))" "$1"
}
tests() {
echo "== 1. GPU tests"
for t in test_train test_optim test_models; do
  timeout 300 "$B/$t" --gtest_filter='*Cuda*:*CUDA*:*OnTheGpu*:*LossInputSampler*:*TrainedSet*' 2>&1 | grep -E "^\[ *(OK|FAILED|SKIPPED|PASSED) |Failure|error"
done
}
demo() {
echo "== 2. demo on the GPU"
for v in sdtrain sdtrain.again "${binaries[@]:1}"; do
  timeout 120 "$B/${v%.again}" --config "$R/configs/demo.json" --overwrite --set output_dir=/tmp/demo-$v \
    --set device=cuda --set mixed_precision=fp16 --set train_text_encoder=true --set snr_gamma=5 \
    --set offset_noise=true --set max_steps=60 --set checkpointing_steps=30 --set validation_steps=30 \
    > "$W/demo-$v.log" 2>&1
  echo "$v rc $?"; grep -m1 "attention kernels" "$W/demo-$v.log"; (cd /tmp/demo-$v && sha256sum unet/*.safetensors text_encoder/*.safetensors checkpoint-30/optimizer.safetensors)
done
}
full_size_model() {
  pip install -q --no-deps --target /tmp/diffusers "$R"/.whl/diffusers-*.whl && export PYTHONPATH=/tmp/diffusers
  [ -d /tmp/sd21 ] || timeout 240 python3 "$R/tools/make_full_size_model.py" /tmp/sd21 || return 1
  mkdir -p /tmp/classes /tmp/instances && cp "$R"/configs/demo/instance/robot* /tmp/classes/
  cp "$R"/configs/demo/instance/robot* /tmp/instances/  # diffusers' scripts read every file as a photo
}
full_size_run() {  # binary output_dir [--set ...]: 80 steps at 512 of the T4 preset on /tmp/sd21
  local bin=$1 out=$2; shift 2
  timeout 150 "$B/$bin" --config "$R/configs/cat-g4dn-t4.json" --overwrite \
    --set pretrained_model_name_or_path=/tmp/sd21 --set instance_data_dir="$R/configs/demo/instance" \
    --set class_data_dir=/tmp/classes --set num_class_images=4 --set output_dir="$out" \
    --set max_steps=80 --set checkpointing_steps=1000 --set validation_prompts=[] \
    --set cache_latents=false --set save_dtype=fp16 --set device=cuda "$@"
}
timing() {
echo "== 3. random-weight SD 2.1-base, 512, batch 1 + prior, fp16, 8-bit AdamW, checkpointing"
full_size_model || return
for round in 1 2; do
  for v in "${binaries[@]}"; do
    full_size_run "$v" /tmp/full-$v > "$W/full-$v-$round.log" 2>&1
    echo "$v round $round rc $?: $(median /tmp/full-$v/logs/metrics.jsonl)"
    cp /tmp/full-$v/logs/metrics.jsonl "$W/full-$v-$round.jsonl"
  done
done
}
profile() {
echo "== 4. where a step's time goes: steps 31-35 under the Kineto profiler"
full_size_model || return
for checkpointing in true false; do
  SDTRAIN_PROFILE=30:5:/tmp/trace-$checkpointing.json full_size_run sdtrain /tmp/prof-$checkpointing \
    --set max_steps=40 --set gradient_checkpointing=$checkpointing > "$W/profile-$checkpointing.log" 2>&1
  echo "gradient_checkpointing $checkpointing rc $?: $(grep 'profile:' "$W/profile-$checkpointing.log")"
  python3 "$R/tools/summarize_trace.py" /tmp/trace-$checkpointing.json --steps 5 | tee "$W/profile-$checkpointing.md"
done
}
lora() {
echo "== 5. LoRA rank 4 on UNet + text encoder, SD 2.1-base random weights, 512, batch 1 + prior, fp16"
full_size_model || return
for checkpointing in false true; do
  full_size_run sdtrain /tmp/lora-$checkpointing --set train_mode=lora --set train_text_encoder=true \
    --set optimizer=adamw --set learning_rate=1e-4 --set gradient_checkpointing=$checkpointing \
    > "$W/lora-$checkpointing.log" 2>&1
  echo "sdtrain lora checkpointing=$checkpointing rc $?: $(median /tmp/lora-$checkpointing/logs/metrics.jsonl)"
  cp /tmp/lora-$checkpointing/logs/metrics.jsonl "$W/lora-$checkpointing.jsonl"
done
[ -f "$R/.whl/train_dreambooth_lora.py" ] || { echo "no .whl/train_dreambooth_lora.py: no diffusers side"; return; }
for checkpointing in "" --gradient_checkpointing; do
  timeout 240 python3 "$R/tools/time_training_script.py" "$R/.whl/train_dreambooth_lora.py" \
    --pretrained_model_name_or_path=/tmp/sd21 --instance_data_dir=/tmp/instances \
    --class_data_dir=/tmp/classes --with_prior_preservation --num_class_images=4 \
    --instance_prompt="a photo of sks robot" --class_prompt="a photo of a robot" \
    --resolution=512 --train_batch_size=1 --max_train_steps=80 --learning_rate=1e-4 --rank=4 \
    --train_text_encoder --mixed_precision=fp16 --checkpointing_steps=1000 --seed=0 \
    --output_dir=/tmp/diffusers-lora $checkpointing > "$W/diffusers-lora$checkpointing.log" 2>&1
  echo "diffusers lora ${checkpointing:-(no checkpointing)} rc $?: $(tail -1 "$W/diffusers-lora$checkpointing.log")"
done
}
bench() {
echo "== 6. the lean-memory benchmark (tools/benchmark.py)"
# GroupNorm + SiLU of SD 2.1-base's UNet, torch against the fused node (seconds); then with each
# pair's convolution, NCHW against channels-last (whether channels-last pays).
timeout 60 "$B/bench_group_norm_silu" | tee "$W/group_norm_silu.jsonl"
timeout 90 "$B/bench_group_norm_silu" --with-conv | tee -a "$W/group_norm_silu.jsonl"
full_size_model || return
local script=(); [ -f "$R/.whl/train_dreambooth.py" ] && script=(--diffusers-script "$R/.whl/train_dreambooth.py")
# BENCH_ROWS: the rows (tools/benchmark.py); every row with diffusers beside does not fit the
# 420 s. Each row's figures are printed as it ends, so a time-out keeps the rows before it.
timeout 420 python3 "$R/tools/benchmark.py" --sdtrain "$B/sdtrain" --model /tmp/sd21 \
  --rows "${BENCH_ROWS:-today,today-eager,today-fused,today-cl,batch-32,batch-32-cl,exact,exact-eager,lean,lean-validation,today-cudnn}" \
  --out "$W/bench" "${script[@]}" 2>&1 | tail -15
}
sampling() {
echo "== 7. sampling against diffusers' pipeline (tools/benchmark_sampling.py)"
full_size_model || return
timeout 240 python3 "$R/tools/benchmark_sampling.py" --sdtrain "$B/sdtrain" --model /tmp/sd21 \
  --out "$W/sampling" 2>&1 | tail -12
# Loading: the direct per-tensor copy (off) against the staging ring (on), alternated, the page
# cache warm from the runs above.
for staged in off on off on; do
  timeout 60 "$B/bench_model_load" --model /tmp/sd21 --device cuda --dtype float16 --load-only \
    --staged $staged | tee -a "$W/model_load.jsonl"
done
# The three components one after another against at once (models/load_components.h), staged.
for whole in one-after-another at-once one-after-another at-once; do
  timeout 60 "$B/bench_model_load" --model /tmp/sd21 --device cuda --dtype float16 \
    --whole $whole | tee -a "$W/model_load.jsonl"
done
}
for section in "${@:-tests demo timing profile}"; do
  for s in $section; do "$s"; collect; done
done
date
