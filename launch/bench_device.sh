#!/usr/bin/env bash
# The accelerator benchmark in one call (GPU or TPU host): pretraining and fine-tuning img/s of
# small, base and reference at 224 px, f32 vs bf16, dense vs sparse masking, remat, compile time,
# peak memory, FLOPs per image and MFU (bf16 pretraining of every preset first, then the variants),
# as a markdown table for BENCHMARKS.md; right after the first case's row, the eager PyTorch mirror on
# that case (JAX / PyTorch ratio) and where its step spends its time.
# No case starts that is expected to end after BUDGET_S seconds (420): a small / base / reference
# case takes at least ~130 / 175 / 225 s on an H200 (session 28's compiles), or what the preset's
# last case took in this call; the first case always runs. The PyTorch mirror and the profile after
# the first case, and a case slower than expected, come on top: give the call ~2 minutes more than
# BUDGET_S. The table also goes to $OUT_FILE.
#
#   launch/bench_device.sh                      # all presets
#   PRESETS=small,base launch/bench_device.sh   # a shorter loan
#   XLA_DEFAULTS=1 launch/bench_device.sh       # XLA's own GPU flags (Triton GEMM fusions on)
#   PROFILE_OPS=1 PRESETS=small launch/bench_device.sh  # CUDA graphs off: the profile names every op
#   CASES='small pretrain bfloat16 sparse,small finetune bfloat16' launch/bench_device.sh  # these cases only
#   BATCH_SIZES=128 CASES='reference pretrain bfloat16 encoder' launch/bench_device.sh  # another batch
#   BATCH_SIZES=max CASES='reference pretrain bfloat16 encoder' launch/bench_device.sh  # and the largest that fits
#   NO_MIRROR=1 launch/bench_device.sh          # no PyTorch mirror (a minute or more; where its number is known)
#
# Compiles, not steps, decide what a short loan measures. On an H200, XLA's autotuner (cuDNN
# convolution algorithms and Triton GEMM fusions; the split was not measured) took ~290 s of a 368 s
# compile of one `small` step, and with the autotuner off (session 5's default here) the step ran
# 79x slower. The model now computes its convolutions as matmuls on GPUs (`config.model.conv_impl=
# auto`), so no convolution is left to tune, and GEMMs go to cuBLAS (Triton GEMM fusions off: each
# is autotuned over many compiled tile configurations), whose few algorithms the autotuner times. The table's first line names
# the XLA_FLAGS its numbers were measured with.
set -euo pipefail

PYTHON="${PYTHON:-python}"
PRESETS="${PRESETS:-small,base,reference}"
BUDGET_S="${BUDGET_S:-420}"
OUT_FILE="${OUT_FILE:-bench_device.md}"
# XLA aborts on a flag it does not know: try each flag first, so that an XLA without it still runs
# the suite (with its own flags, which the table's first line then shows). XLA reads every flag, GPU
# ones too, whichever backend starts: the CPU's, seconds sooner than the GPU's.
add_xla_flag() {
  if XLA_FLAGS="${XLA_FLAGS:-} $1" JAX_PLATFORMS=cpu "$PYTHON" -c "import jax; jax.devices()" >/dev/null 2>&1; then
    export XLA_FLAGS="${XLA_FLAGS:-} $1"
  else
    echo "note: this XLA does not take $1; the suite runs without it" >&2
  fi
}
if [[ "${XLA_DEFAULTS:-0}" == 0 ]]; then
  add_xla_flag "--xla_gpu_enable_triton_gemm=false"
fi
# XLA:GPU runs a step as CUDA graphs, which a profile cannot break down by op (session 28's H200):
# PROFILE_OPS=1 turns them off for a run whose point is the first case's per-op profile.
if [[ "${PROFILE_OPS:-0}" == 1 ]]; then
  add_xla_flag "--xla_gpu_enable_command_buffer="
fi

cd "$(dirname "$0")/.."
MIRROR=--suite_mirror
if [[ "${NO_MIRROR:-0}" == 1 ]]; then
  MIRROR=--nosuite_mirror
fi
"$PYTHON" -m gmae_jax.bench --suite=device --suite_presets="$PRESETS" --suite_cases="${CASES:-}" \
  --suite_batch_sizes="${BATCH_SIZES:-}" --suite_budget_s="$BUDGET_S" "$MIRROR" | tee "$OUT_FILE"
