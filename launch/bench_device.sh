#!/usr/bin/env bash
# The accelerator benchmark in one call (GPU or TPU host): pretraining and fine-tuning img/s of
# small, base and reference at 224 px, f32 vs bf16, dense vs sparse masking, remat, compile time,
# peak memory, FLOPs per image and MFU (bf16 pretraining of every preset first, then the variants),
# as a markdown table for BENCHMARKS.md, then where the first case's step spends its time.
# Finishes within ~8 minutes including compiles; the table also goes to $OUT_FILE.
#
#   launch/bench_device.sh                      # all presets
#   PRESETS=small,base launch/bench_device.sh   # a shorter loan
#   GPU_AUTOTUNE=1 launch/bench_device.sh        # XLA's GPU autotuning on (slow compiles)
#
# XLA's GPU autotuner (conv algorithms, GEMM fusions) is off by default here: with it on, the first
# H200 run spent 368 s compiling one `small` step, the whole budget of a short loan. The table's
# first line names the XLA_FLAGS its numbers were measured with.
set -euo pipefail

PYTHON="${PYTHON:-python}"
PRESETS="${PRESETS:-small,base,reference}"
BUDGET_S="${BUDGET_S:-420}"
OUT_FILE="${OUT_FILE:-bench_device.md}"
if [[ "${GPU_AUTOTUNE:-0}" == 0 ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_autotune_level=0"
fi

cd "$(dirname "$0")/.."
"$PYTHON" -m gmae_jax.bench --suite=device --suite_presets="$PRESETS" --suite_budget_s="$BUDGET_S" \
  | tee "$OUT_FILE"
