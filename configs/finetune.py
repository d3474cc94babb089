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

    config.data = ml_collections.ConfigDict()
    config.data.root = "data/finetune_dataset"
    # 'auto' detects from the folders under root; or force 'class_folders' (<root>/{train,val}/<class>),
    # 'hagrid_v2', 'hagrid_v1' (train/val = ann_train_val re-split by user, test = ann_test) or
    # 'prepared' (a corpus folder written by configs/prepare.py: <out>/pretrain or <out>/finetune).
    config.data.layout = "auto"
    # HaGRID only: 'full_frame' (letterboxed frame) or 'hand_crop' (square around the gesture box).
    config.data.mode = "full_frame"
    config.data.crop_scale_max = 2.0  # hand_crop: training crop side = box side x U(1, this); eval 1.0
    config.data.no_gesture_prob = 0.0  # hand_crop: chance to crop a free no_gesture hand instead
    config.data.v1_val_fraction = 0.2  # HaGRID v1: users of ann_train_val held out for 'val'
    config.data.split_seed = 0  # HaGRID v1: seed of that user split
    # Unreadable images met in training are logged and replaced by the next one (left out of
    # evaluation); more than this many per loader process stops the run with an error.
    config.data.max_bad_images = 100
    config.data.train_split = "train"
    config.data.eval_split = "val"
    config.data.num_workers = 4
    config.data.aug = ml_collections.ConfigDict(dict(
        crop_scale_min=0.35, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1))

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
        config.model = config_lib.model_config("micro")
        config.data.num_workers = 0
        config.batch_size = 16
        config.total_steps = 20
        config.optim.warmup_steps = 5
        config.log_every = 5
        config.eval_every = 10
        config.checkpoint_every = 10
    return config
