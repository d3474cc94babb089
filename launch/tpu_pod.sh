#!/usr/bin/env bash
# Pretraining on a Cloud TPU pod slice. Copies this checkout to every worker VM, installs it, and
# runs the same command on all of them; --distributed_auto lets JAX read the slice's layout from
# the TPU environment. Extra flags for gmae_jax.main follow, e.g. --config.batch_size=1024.
#
#   TPU_NAME=gmae-v4-32 ZONE=us-central2-b PROJECT=my-project launch/tpu_pod.sh --config.total_steps=50000
#
# The output of all workers streams here; a disconnect stops the run (the next start resumes
# from the last checkpoint in WORKDIR).
set -euo pipefail

TPU_NAME="${TPU_NAME:-gmae-v4-32}"
ZONE="${ZONE:-us-central2-b}"
PROJECT="${PROJECT:-my-gcp-project}"
CONFIG="${CONFIG:-configs/pretrain.py:model=base}"
WORKDIR="${WORKDIR:-gs://my-bucket/gmae/pretrain}"                # shared by all workers (checkpoints)
DATA_ROOT="${DATA_ROOT:-gs://my-bucket/gmae/data/pretrain_dataset}"  # readable from every worker

cd "$(dirname "$0")/.."
where=(--project="$PROJECT" --zone="$ZONE" --worker=all)
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
archive="$staging/gmae_jax.tar.gz"
git archive --format=tar.gz --output="$archive" HEAD  # committed code only, as every worker will run it

gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:gmae_jax.tar.gz" "${where[@]}"

# gcsfs lets orbax (through etils.epath) read and write gs:// folders. Single quotes: $HOME and ~
# expand on the worker.
# shellcheck disable=SC2016
install='rm -rf ~/gmae_jax && mkdir ~/gmae_jax && tar -xzf ~/gmae_jax.tar.gz -C ~/gmae_jax &&
  python3 -m venv ~/gmae_venv && ~/gmae_venv/bin/pip install -q -e "$HOME/gmae_jax[tpu]" gcsfs'
printf -v flags ' %q' --config="$CONFIG" --workdir="$WORKDIR" --config.data.root="$DATA_ROOT" "$@"
train="cd ~/gmae_jax && ~/gmae_venv/bin/python -m gmae_jax.main --distributed_auto$flags"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command="$install && $train"
