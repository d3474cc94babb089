"""Masked-autoencoder pretraining on unlabelled gesture images.

  python -m gmae_jax.main --config=configs/pretrain.py:model=small --workdir=/tmp/pretrain \
      --config.data.root=data/pretrain_dataset

Variants after ':': model=<preset> (reference, base, small, tiny, micro), runlocal (a few steps).
Defaults follow the original recipe where it is sane: AdamW, wd 0.05, batch 64, 224 px, patch 16.
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="small", runlocal=False)
    config = ml_collections.ConfigDict()
    config.stage = "pretrain"
    config.seed = 42

    config.model = config_lib.model_config(arg.model)
    config.mask_ratio = 0.6  # The original's pretraining script; the paper finds 0.5-0.7 best.
    config.norm_pix_loss = False  # The original predicts normalised pixels without per-patch norm.

    config.data = config_lib.data_config("data/pretrain_dataset", crop_scale_min=0.2)

    # Devices: a (data, fsdp) mesh over all devices of all processes; -1 fills. fsdp > 1 splits every
    # large parameter and its optimiser state over that many devices (needed for `reference`).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.step_impl = "jit"  # or 'shard_map' (explicit collectives; same numbers)
    config.grad_accum_steps = 1  # micro-batches per step: batch_size / this images in memory at once

    config.batch_size = 64  # global, over all devices and hosts
    config.num_epochs = 200.0
    config.total_steps = 0  # > 0 overrides num_epochs

    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, min_lr=1e-6, warmup_steps=1000, weight_decay=0.05, b1=0.9, b2=0.999,
        grad_clip=1.0, layer_decay=1.0))

    config.log_every = 50
    config.eval_every = 2000  # 0 = only at the end
    config.checkpoint_every = 2000
    config.keep_checkpoints = 3
    config.num_reconstructions = 8  # images in reconstructions.png

    if arg.runlocal:
        config_lib.make_runlocal(config)
    return config
