#!/usr/bin/env bash
# Pretraining on a Cloud TPU pod slice. Copies this checkout to every worker VM, installs it, and
# runs the same command on all of them; --distributed_auto lets JAX read the slice's layout from
# the TPU environment. Extra flags for gmae_jax.main follow, e.g. --config.batch_size=1024.
#
#   TPU_NAME=gmae-v4-32 ZONE=us-central2-b PROJECT=my-project WORKDIR=gs://my-bucket/gmae/pretrain \
#     DATA_ROOT=gs://my-bucket/gmae/data/pretrain_dataset launch/tpu_pod.sh --config.total_steps=50000
#
# The output of all workers streams here; a disconnect stops the run (the next start resumes
# from the last checkpoint in WORKDIR).
set -euo pipefail

TPU_NAME="${TPU_NAME:-gmae-v4-32}"
ZONE="${ZONE:-us-central2-b}"
CONFIG="${CONFIG:-configs/pretrain.py:model=base}"
# No defaults: a made-up project or bucket would fail in gcloud after the upload, or on every worker.
for setting in PROJECT WORKDIR DATA_ROOT; do
  if [[ -z "${!setting:-}" ]]; then
    echo "error: set $setting (PROJECT: your GCP project; WORKDIR: a gs:// folder every worker writes the" \
      "checkpoints to; DATA_ROOT: a gs:// folder of images every worker reads)" >&2
    exit 2
  fi
done

cd "$(dirname "$0")/.."
where=(--project="$PROJECT" --zone="$ZONE" --worker=all)
staging="$(mktemp -d)"
trap 'rm -rf "$staging"' EXIT
archive="$staging/gmae_jax.tar.gz"
git archive --format=tar.gz --output="$archive" HEAD  # committed code only, as every worker will run it

gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:gmae_jax.tar.gz" "${where[@]}"

# The gcs extra (gcsfs) lets orbax (through etils.epath) read and write gs:// folders; the lock file
# pins what CI tested (JAX, flax, orbax, grain), as the README's install does. Single quotes: $HOME
# and ~ expand on the worker.
# shellcheck disable=SC2016
install='rm -rf ~/gmae_jax && mkdir ~/gmae_jax && tar -xzf ~/gmae_jax.tar.gz -C ~/gmae_jax &&
  python3 -m venv ~/gmae_venv &&
  ~/gmae_venv/bin/pip install -q -c "$HOME/gmae_jax/requirements.lock" -e "$HOME/gmae_jax[tpu,gcs]"'
printf -v flags ' %q' --config="$CONFIG" --workdir="$WORKDIR" --config.data.root="$DATA_ROOT" "$@"
train="cd ~/gmae_jax && ~/gmae_venv/bin/python -m gmae_jax.main --distributed_auto$flags"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${where[@]}" --command="$install && $train"
