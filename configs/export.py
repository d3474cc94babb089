"""Exports a checkpoint of a pretrain or finetune run for PyTorch users.

  python -m gmae_jax.main --config=configs/export.py --workdir=/tmp/export \
      --config.checkpoint_dir=/tmp/finetune [--config.checkpoint=best|N]

Writes model.pth (loads with strict=True into the original's GMAEForClassification or GMAE),
model.safetensors, encoder.pth and config.json (architecture, classes, preprocessing) into WORKDIR
(a local folder or gs://); nothing is written into CHECKPOINT_DIR. Needs torch (the [torch] extra).
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config_lib.parse_arg(arg)  # no variants: anything after ':' is an error
    config = ml_collections.ConfigDict()
    config.stage = "export"
    config.checkpoint_dir = ""  # workdir of a pretrain or finetune run
    config.checkpoint = "latest"  # 'latest', 'best' (by the run's config.best_metric) or a step
    # 'auto': the original's layout where it can hold the model, else the mirror's (with a notice);
    # 'original' makes a model it cannot hold (overlap_patches=True) an error; 'mirror' always.
    config.layout = "auto"
    return config
