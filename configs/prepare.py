"""Corpus preparation: a raw HaGRID tree -> checked, de-duplicated, user-split ArrayRecord shards.

  python -m gmae_jax.main --config=configs/prepare.py --workdir=data/hagrid_prepared \
      --config.data.root=/data/hagrid

Then train with --config.data.root=data/hagrid_prepared/pretrain (or .../finetune). Splits keep
every person on one side: pretrain / fine-tune 70 / 30 as the original, then train / val in each
(so each of the four needs people of its own: with these fractions, ~20 people at the least).
"""

import dataclasses

import ml_collections

from gmae_jax import config_lib, schema


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config_lib.parse_arg(arg)  # no variants: anything after ':' is an error
    config = ml_collections.ConfigDict()
    config.stage = "prepare"
    config.seed = 0  # decides the user splits

    config.data = ml_collections.ConfigDict()
    config.data.root = "data/hagrid"  # a HaGRID v1 or v2 tree as distributed
    config.data.layout = "auto"  # or force 'hagrid_v1' / 'hagrid_v2'
    # 'hagrid' (official list), 'present' (class folders found) or 'name1,name2,...'; and the
    # fraction of images that may be dropped before the stage stops: see gmae_jax/schema.py DataConfig.
    config.data.classes = schema.DataConfig.classes
    config.data.max_dropped_fraction = schema.DataConfig.max_dropped_fraction

    config.corpora = ml_collections.ConfigDict(dict(pretrain=0.7, finetune=0.3))  # by user
    # Within each corpus, by user. A split of its own, e.g. a test split, replaces the whole dict:
    # --config.splits="{'train': 0.8, 'val': 0.1, 'test': 0.1}".
    config.splits = ml_collections.ConfigDict(dict(train=0.9, val=0.1))
    # HaGRID's official test split (v2 hagrid_annotations/test, v1 ann_test) stays out of the corpora, so
    # that its people are never trained on and runs can be scored on it as published results are
    # (configs/evaluate.py --config.data_root=RAW_TREE --config.split=test); True splits it in too.
    config.include_official_test = False

    # 'full_frame': frames with shorter side image_side (train with data.mode full_frame; hand_crop
    # works too, but a HaGRID hand is ~1/7 of a 256 px frame's side, so its crops are enlarged ~6x);
    # 'hand_crop': crop_size squares around the gesture box at crop_scale_max, so every training crop
    # (scale 1..crop_scale_max) fits inside (train with data.mode hand_crop); of the free (no_gesture)
    # hands, those a square holds whole stay annotated, so no_gesture_prob draws from fewer of them
    # than on the raw tree.
    # view, image_side, crop_size, crop_scale_max (keep equal to the training
    # config.data.crop_scale_max), jpeg_quality: defaults in gmae_jax.schema.StoreView.
    config.update(dataclasses.asdict(schema.StoreView()))

    config.records_per_shard = 1000  # ~30-60 MB shards at 256 px
    config.num_workers = -1  # processes for decoding and writing: -1 = one per core this process may use, 0 = none
    config.class_folders = False  # also write class_folders/{pretrain,finetune}_dataset/<split>/<class>/
    # A workdir prepared from other settings or since-changed images is refused; True removes its
    # shards, indexes, manifest and class folders and prepares anew (the decode checks are kept).
    config.rebuild = False
    return config
