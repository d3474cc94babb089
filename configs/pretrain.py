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

    config.data = ml_collections.ConfigDict()
    config.data.root = "data/pretrain_dataset"
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
    config.data.num_workers = 4  # grain worker processes; 0 = in the main process
    config.data.aug = ml_collections.ConfigDict(dict(
        crop_scale_min=0.2, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1))

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
        config.model = config_lib.model_config("micro")
        config.data.num_workers = 0
        config.batch_size = 16
        config.total_steps = 20
        config.optim.warmup_steps = 5
        config.log_every = 5
        config.eval_every = 10
        config.checkpoint_every = 10
    return config
