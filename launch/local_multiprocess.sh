#!/usr/bin/env bash
# NUM_PROCESSES JAX processes on this machine, each with DEVICES_PER_PROCESS CPU devices, joined
# into one job: the multi-host code path in miniature, without a pod (tests/test_multiprocess.py
# does the same from Python). Any flags for gmae_jax.main follow:
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh \
#       --config=configs/pretrain.py:runlocal --workdir=/tmp/gmae_mp --config.data.root=data/demo
#
# Process 0 logs to the terminal, the others to $LOG_DIR/process_<rank>.log.
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python}"
LOG_DIR="${LOG_DIR:-/tmp/gmae_local_multiprocess}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

cd "$(dirname "$0")/.."
mkdir -p "$LOG_DIR"
unset XLA_FLAGS  # a leftover --xla_force_host_platform_device_count would fight --num_cpu_devices
export JAX_PLATFORMS=cpu

run_process() {  # run_process RANK FLAGS...
  local rank="$1"
  shift
  "$PYTHON" -m gmae_jax.main "$@" --num_cpu_devices="$DEVICES_PER_PROCESS" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$rank"
}

pids=()
# A process that dies leaves the others waiting in a collective: take them down with this script.
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
for ((rank = 1; rank < NUM_PROCESSES; rank++)); do
  run_process "$rank" "$@" >"$LOG_DIR/process_$rank.log" 2>&1 &
  pids+=("$!")
done

status=0
run_process 0 "$@" || status=$?
for i in "${!pids[@]}"; do
  code=0
  wait "${pids[$i]}" || code=$?
  if ((code != 0)); then
    ((status != 0)) || status=$code  # 75: preempted after a checkpoint (rerun to resume); else failed
    ((code == 75)) || echo "process $((i + 1)) failed; see $LOG_DIR/process_$((i + 1)).log" >&2
  fi
done
exit "$status"
