#!/usr/bin/env bash
# One process per GPU node; each drives all GPUs of its node. Run the same line on every node,
# changing only NODE_RANK (0 on the node whose address is COORDINATOR):
#
#   NODE_RANK=0 NUM_NODES=2 COORDINATOR=10.0.0.1:1234 launch/gpu_multinode.sh \
#       --config=configs/pretrain.py:model=base --workdir=/shared/gmae/pretrain \
#       --config.data.root=/shared/gmae/data/pretrain_dataset
#
# Under SLURM the job already says who is who; leave NODE_RANK unset and JAX reads SLURM_*
# itself (--distributed_auto):
#
#   srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 launch/gpu_multinode.sh --config=... --workdir=...
#
# The workdir must be storage that every node sees: all processes write one orbax checkpoint (they
# check that they see process 0's lock file in it before training). COORDINATOR's port must be free:
# process 0 refuses one in use, but the other nodes' processes would join whatever job listens there.
set -euo pipefail

PYTHON="${PYTHON:-python}"
cd "$(dirname "$0")/.."

fail() {  # one line naming the setting, before anything starts
  echo "error: $*" >&2
  exit 2
}
if [[ -n "${NODE_RANK:-}" ]]; then
  if ! [[ "${NUM_NODES:-}" =~ ^[0-9]+$ ]] || ((10#$NUM_NODES < 1)); then
    fail "NUM_NODES=${NUM_NODES:-} must be the number of nodes in the job (a whole number of at least 1)"
  fi
  if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || ((10#$NODE_RANK >= 10#$NUM_NODES)); then
    fail "NODE_RANK=$NODE_RANK must be this node's rank, 0 to $((10#$NUM_NODES - 1)) (0 on the COORDINATOR's node)"
  fi
  if ! [[ "${COORDINATOR:-}" =~ ^[^:]+:[0-9]+$ ]]; then
    fail "COORDINATOR=${COORDINATOR:-} must be HOST:PORT of node 0, e.g. COORDINATOR=10.0.0.1:1234"
  fi
  distributed=(--coordinator_address="$COORDINATOR" --num_processes="$NUM_NODES" --process_id="$NODE_RANK")
elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
  distributed=(--distributed_auto)
else
  fail "set NODE_RANK, NUM_NODES and COORDINATOR (HOST:PORT of node 0), or start this script with srun"
fi

exec "$PYTHON" -m gmae_jax.main "${distributed[@]}" "$@"
