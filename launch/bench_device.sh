#!/usr/bin/env bash
# The accelerator benchmark in one call (GPU or TPU host): pretraining and fine-tuning img/s of
# small, base and reference at 224 px, f32 vs bf16, dense vs sparse masking, remat, compile time,
# peak memory, FLOPs per image and MFU, cheapest cases first, as a markdown table for BENCHMARKS.md.
# Finishes within ~8 minutes including compiles; the table also goes to $OUT_FILE.
#
#   launch/bench_device.sh                      # all presets
#   PRESETS=small,base launch/bench_device.sh   # a shorter loan
set -euo pipefail

PYTHON="${PYTHON:-python}"
PRESETS="${PRESETS:-small,base,reference}"
BUDGET_S="${BUDGET_S:-420}"
OUT_FILE="${OUT_FILE:-bench_device.md}"

cd "$(dirname "$0")/.."
"$PYTHON" -m gmae_jax.bench --suite=device --suite_presets="$PRESETS" --suite_budget_s="$BUDGET_S" \
  | tee "$OUT_FILE"
