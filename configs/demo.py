"""The embedded demo: writes a small synthetic gesture set (drawn hands, real JPEGs), pretrains a
`mini` G-MAE on it, fine-tunes the encoder as a classifier and evaluates. No download; a few
minutes on 2 CPU cores.

  python -m gmae_jax.main --config=configs/demo.py --workdir=/tmp/gmae_demo
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    config = ml_collections.ConfigDict()
    config.stage = "demo"

    # Two disjoint sets, like the original's pretrain_dataset / finetune_dataset.
    config.dataset = ml_collections.ConfigDict(dict(
        classes=("fist", "one", "peace", "palm"), image_size=36,
        pretrain_train_per_class=400, pretrain_val_per_class=25,
        finetune_train_per_class=300, finetune_val_per_class=50))

    pretrain = config_lib.load_sibling_config(__file__, "pretrain", "model=mini")
    pretrain.data.root = ""  # set by the demo to WORKDIR/data/pretrain_dataset
    pretrain.data.num_workers = 0
    pretrain.data.aug.update(crop_scale_min=0.7, hue=0.05)
    pretrain.batch_size = 64
    pretrain.total_steps = 400
    pretrain.mask_ratio = 0.6
    pretrain.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.05)
    pretrain.log_every = 25
    pretrain.eval_every = 200
    pretrain.checkpoint_every = 200
    config.pretrain = pretrain

    finetune = config_lib.load_sibling_config(__file__, "finetune", "model=mini")
    finetune.data.root = ""  # set by the demo to WORKDIR/data/finetune_dataset
    finetune.data.num_workers = 0
    finetune.data.aug.update(crop_scale_min=0.7, hue=0.05)
    finetune.num_classes = len(config.dataset.classes)
    finetune.batch_size = 64
    finetune.total_steps = 600
    finetune.optim.update(lr=2e-3, warmup_steps=30, weight_decay=0.01, layer_decay=0.9)
    finetune.log_every = 25
    finetune.eval_every = 200
    finetune.checkpoint_every = 200
    config.finetune = finetune
    return config
