"""Evaluates a checkpoint of a pretrain or finetune workdir on its validation split.

  python -m gmae_jax.main --config=configs/evaluate.py --workdir=/tmp/eval \
      --config.checkpoint_dir=/tmp/finetune [--config.checkpoint=best]

The model and data settings are read from CHECKPOINT_DIR/config.json; override the data with
--config.data_root / --config.split. Writes eval_metrics.json, and for a classifier
confusion_matrix.png / .json and misclassified.png, for a pretraining run reconstructions.png, and
the same to tensorboard/. The training split is never opened.
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config_lib.parse_arg(arg)  # no variants: anything after ':' is an error
    config = ml_collections.ConfigDict()
    config.stage = "evaluate"
    config.checkpoint_dir = ""  # workdir of a pretrain or finetune run
    config.checkpoint = "latest"  # 'latest', 'best' (by the run's config.best_metric) or a step
    config.data_root = ""  # '' = the run's own config.data.root
    config.split = ""  # '' = the run's own eval split
    config.batch_size = 64
    config.num_workers = -1  # grain workers: -1 = one per core, less one (as config.data.num_workers)
    return config
