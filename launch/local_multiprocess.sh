#!/usr/bin/env bash
# NUM_PROCESSES JAX processes on this machine, each with DEVICES_PER_PROCESS CPU devices, joined
# into one job: the multi-host code path in miniature, without a pod (tests/test_multiprocess.py
# does the same from Python). Any flags for gmae_jax.main follow:
#
#   NUM_PROCESSES=2 DEVICES_PER_PROCESS=4 launch/local_multiprocess.sh \
#       --config=configs/pretrain.py:runlocal --workdir=/tmp/gmae_mp --config.data.root=/tmp/gmae_demo/data/pretrain_dataset
#
# Process 0 logs to the terminal, the others to $LOG_DIR/process_<rank>.log (appended to, under a
# line that says which launch it was; by default a folder per job's coordinator port).
set -euo pipefail

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-4}"
PYTHON="${PYTHON:-python}"
STOP_GRACE_S="${STOP_GRACE_S:-10}"  # after SIGTERM, before SIGKILL, when the others are stopped
if ! command -v "$PYTHON" >/dev/null; then
  echo "error: PYTHON=$PYTHON is not a program here; set PYTHON to the environment's interpreter, e.g." \
    "PYTHON=.venv/bin/python" >&2
  exit 2
fi
check_count() {  # check_count NAME MINIMUM: a whole number, or stop before anything starts
  local value="${!1}"
  if ! [[ "$value" =~ ^[0-9]+$ ]] || ((10#$value < $2)); then
    echo "error: $1=$value must be a whole number of at least $2" >&2
    exit 2
  fi
}
check_count NUM_PROCESSES 1
check_count DEVICES_PER_PROCESS 1
check_count STOP_GRACE_S 0
if [[ -n "${PORT:-}" ]] && ! { [[ "$PORT" =~ ^[0-9]+$ ]] && ((10#$PORT >= 1 && 10#$PORT <= 65535)); }; then
  echo "error: PORT=$PORT must be a TCP port, 1-65535 (or leave PORT unset to pick a free one)" >&2
  exit 2
fi
if [[ -n "${PORT:-}" ]] && timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$PORT" 2>/dev/null; then
  # A job whose processes join another job's coordinator makes that job abort ("a different incarnation").
  echo "error: PORT=$PORT is in use on this host (another job's coordinator?); give this job a free PORT, or leave" \
    "PORT unset to pick one" >&2
  exit 2
fi
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
LOG_DIR="${LOG_DIR:-${TMPDIR:-/tmp}/gmae_local_multiprocess/port_$PORT}"

cd "$(dirname "$0")/.."
mkdir -p "$LOG_DIR"
# A leftover --xla_force_host_platform_device_count would fight --num_cpu_devices; other XLA flags stay.
XLA_FLAGS="$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')"
export XLA_FLAGS
export JAX_PLATFORMS=cpu

run_process() {  # run_process RANK FLAGS..., in a background subshell that becomes the process
  local rank="$1"
  shift
  exec "$PYTHON" -m gmae_jax.main "$@" --num_cpu_devices="$DEVICES_PER_PROCESS" \
    --coordinator_address="127.0.0.1:$PORT" --num_processes="$NUM_PROCESSES" --process_id="$rank"
}

pids=()
declare -A rank_of  # PID -> rank
# A process that dies leaves the others waiting in a collective (JAX aborts them only after ~100 s),
# where SIGTERM (a preemption: save at the next step) never takes effect: the first failure, and this
# script's own exit, stop the rest with SIGTERM and then SIGKILL, and wait until they are gone (on a
# GPU host a leftover would hold its device's memory during the rerun).
# shellcheck disable=SC2329  # invoked by the EXIT trap below
stop_all() {
  kill "${pids[@]}" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_GRACE_S))
  while ((SECONDS < deadline)) && kill -0 "${pids[@]}" 2>/dev/null; do
    sleep 0.2 || true
  done
  kill -KILL "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
}
trap stop_all EXIT
# SIGTERM to this script is a preemption of the whole job: each process saves the same step and exits
# 75, and so does this script (a job script requeues on 75), instead of dying with 143 before them.
# shellcheck disable=SC2329  # invoked by the TERM trap below
preempt_all() {
  kill -TERM "${pids[@]}" 2>/dev/null || true
}
trap preempt_all TERM
# A Ctrl-C at the terminal reaches every process already; SIGINT to this script alone (kill -INT) is
# passed on, a moment later, so that it reaches them too (each takes the first one it gets).
# shellcheck disable=SC2329  # invoked by the INT trap below
interrupt_all() {
  sleep 0.5 || true
  kill -INT "${pids[@]}" 2>/dev/null || true
}
trap interrupt_all INT
for ((rank = 0; rank < NUM_PROCESSES; rank++)); do
  if ((rank == 0)); then
    run_process 0 "$@" &
  else
    log="$LOG_DIR/process_$rank.log"
    echo "=== $(date -u '+%Y-%m-%d %H:%M:%S UTC'): process $rank of $NUM_PROCESSES, coordinator port $PORT ===" >>"$log"
    run_process "$rank" "$@" >>"$log" 2>&1 &
  fi
  pids+=("$!")
  rank_of[$!]=$rank
done
((NUM_PROCESSES == 1)) || echo "logs of processes 1 to $((NUM_PROCESSES - 1)): $LOG_DIR/process_<rank>.log" >&2

# Each exit is read with `wait PID` once the process is gone (bash keeps its status): `wait -n` cannot
# tell a process that died of the signal from the TERM trap interrupting the wait.
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  still=()
  for pid in "${running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      still+=("$pid")
      continue
    fi
    code=0
    wait "$pid" || code=$?
    if ((code == 75)); then
      status=75  # preempted after a checkpoint: the others are saving the same step; rerun to resume
    elif ((code == 130)); then
      status=130  # interrupted (Ctrl-C): so are the others
    elif ((code != 0)); then
      how="status $code"
      if ((code > 128)); then
        how="killed by SIG$(kill -l $((code - 128)) 2>/dev/null || echo $((code - 128))), status $code"
        ((code != 137)) || how="$how: the out-of-memory killer? dmesg says"
      fi
      echo "process ${rank_of[$pid]} failed ($how); stopping the others. Logs: $LOG_DIR/process_<rank>.log" >&2
      exit "$code"
    fi
  done
  running=("${still[@]}")
  sleep 0.2 || true  # a SIGTERM to the whole process group ends the sleep too
done
exit "$status"
