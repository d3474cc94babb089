"""The demo stage: synthetic data -> pretrain -> fine-tune from the pretrained encoder -> evaluate
(configs/demo.py)."""

from __future__ import annotations

import os

import ml_collections

from gmae_jax.data import synthetic
from gmae_jax.stages import finetune as finetune_stage
from gmae_jax.stages import pretrain as pretrain_stage


def validate(config: ml_collections.ConfigDict) -> None:
    """The two training configs; their data folders do not exist until the demo writes them."""
    pretrain_stage.validate(config.pretrain, check_data=False)
    finetune_stage.validate(config.finetune, check_data=False)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    ds = config.dataset
    data_root = os.path.join(workdir, "data")
    pretrain_root = os.path.join(data_root, "pretrain_dataset")
    finetune_root = os.path.join(data_root, "finetune_dataset")
    synthetic.ensure_demo_dataset(pretrain_root, image_size=ds.image_size, seed=0, classes=ds.classes,
                                  train_per_class=ds.pretrain_train_per_class,
                                  val_per_class=ds.pretrain_val_per_class)
    synthetic.ensure_demo_dataset(finetune_root, image_size=ds.image_size, seed=1, classes=ds.classes,
                                  train_per_class=ds.finetune_train_per_class,
                                  val_per_class=ds.finetune_val_per_class)

    pretrain = config.pretrain.copy_and_resolve_references()
    pretrain.data.root = pretrain_root
    pretrain_dir = os.path.join(workdir, "pretrain")
    pretrain_stage.run(pretrain, pretrain_dir)

    finetune = config.finetune.copy_and_resolve_references()
    finetune.data.root = finetune_root
    finetune.init_from = pretrain_dir
    finetune_dir = os.path.join(workdir, "finetune")
    metrics = finetune_stage.run(finetune, finetune_dir)

    chance = 1.0 / finetune.num_classes
    summary = (
        f"\n=== G-MAE demo finished ===\n"
        f"fine-tuned accuracy on {finetune_root}/val: {metrics['accuracy']:.3f} (chance {chance:.3f})\n"
        f"pretraining: {pretrain_dir} (metrics.jsonl, reconstructions.png, checkpoints/)\n"
        f"fine-tuning: {finetune_dir} (metrics.jsonl, confusion_matrix.png, checkpoints/)\n"
    )
    print(summary, flush=True)
    return metrics
