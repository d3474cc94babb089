"""Fine-tunes the pretrained encoder as a gesture classifier (all layers train; nothing is frozen).

  python -m gmae_jax.main --config=configs/finetune.py:model=small --workdir=/tmp/finetune \
      --config.data.root=data/finetune_dataset --config.init_from=/tmp/pretrain/checkpoints
"""

import ml_collections

from gmae_jax import config_lib


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    arg = config_lib.parse_arg(arg, model="small", runlocal=False)
    config = ml_collections.ConfigDict()
    config.stage = "finetune"
    config.seed = 42

    config.model = config_lib.model_config(arg.model)
    config.num_classes = 18  # HaGRID v1 gestures, as the original; must match the class folders
    # Checkpoints folder of a pretraining run; '' trains from scratch.
    config.init_from = ""
    config.label_smoothing = 0.1
    # Linear probing: train only the head on a frozen encoder (the original froze it for good;
    # here it is a choice, and the standard cheap measure of what pretraining learned).
    config.freeze_encoder = False

    config.data = config_lib.data_config("data/finetune_dataset", crop_scale_min=0.35)

    # Devices: a (data, fsdp) mesh over all devices of all processes; -1 fills. fsdp > 1 splits every
    # large parameter and its optimiser state over that many devices (needed for `reference`).
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1))
    config.step_impl = "jit"  # or 'shard_map' (explicit collectives; same numbers)
    config.grad_accum_steps = 1  # micro-batches per step: batch_size / this images in memory at once

    config.batch_size = 64
    config.num_epochs = 100.0
    config.total_steps = 0

    config.optim = ml_collections.ConfigDict(dict(
        lr=1e-4, min_lr=1e-6, warmup_steps=500, weight_decay=0.01, b1=0.9, b2=0.999,
        grad_clip=1.0, layer_decay=0.75))

    config.log_every = 50
    config.eval_every = 1000
    config.checkpoint_every = 1000
    config.keep_checkpoints = 3

    if arg.runlocal:
        config_lib.make_runlocal(config)
    return config
