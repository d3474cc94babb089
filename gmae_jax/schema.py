"""The default of every config field, written once: one frozen dataclass per config section.

Config files (`configs/<stage>.py`) start from these with `to_config_dict` and override what their
stage needs; code that consumes a section reads it back with `read(Section, config.section)`, so it
gets typed values and never a `ConfigDict.get(name, fallback)` with a second copy of a default.
A run's saved `config.json` from before a field existed reads back with that field's default.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import ml_collections


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to change."""


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """`config.data.aug`: training augmentation (evaluation views are never augmented)."""

    crop_scale_min: float = 0.35  # random resized crop: area fraction in [this, 1]
    hflip: bool = True
    brightness: float = 0.4  # colour jitter factors in [1 - x, 1 + x]
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1  # hue shift in [-hue, hue]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """`config.data`: where the images are and how they become model inputs."""

    root: str = ""
    # 'auto' detects from the folders under root; or force 'class_folders' (<root>/{train,val}/<class>),
    # 'hagrid_v2', 'hagrid_v1' (train/val = ann_train_val re-split by user, test = ann_test),
    # 'prepared' (a corpus folder written by configs/prepare.py: <out>/pretrain or <out>/finetune) or
    # 'tfds' (a `tfds build` of gmae_jax/data/tfds_hagrid.py: root is its --data_dir).
    layout: str = "auto"
    # HaGRID only: 'full_frame' (letterboxed frame) or 'hand_crop' (square around the gesture box).
    mode: str = "full_frame"
    crop_scale_max: float = 2.0  # hand_crop: training crop side = box side x U(1, this); eval 1.0
    no_gesture_prob: float = 0.0  # hand_crop: chance to crop a free no_gesture hand instead
    v1_val_fraction: float = 0.2  # HaGRID v1: users of ann_train_val held out for 'val'
    split_seed: int = 0  # HaGRID v1: seed of that user split
    # Unreadable images met in training are logged and replaced by the next one (left out of
    # evaluation); more than this many per loader process stops the run with an error.
    max_bad_images: int = 100
    # HaGRID layouts: the classes that labels index. 'hagrid': the official v1 / v2 list (a label
    # means the same class in every run); 'present': the class folders found, sorted (no_gesture
    # last); or the names, comma-separated, in label order (e.g. 'wave,point,no_gesture').
    classes: str = "hagrid"
    # Images that reading would drop (unknown class, unannotated, no usable box, ...) beyond this
    # fraction stop the run with the counts per reason and class, instead of training on the rest.
    max_dropped_fraction: float = 0.05
    train_split: str = "train"
    eval_split: str = "val"
    # grain worker processes; 0 = in the main process; -1 = a worker per core this process may use,
    # less one for the trainer, at most 32 (with several training processes on one host, set it).
    num_workers: int = -1
    aug: AugmentConfig = AugmentConfig()


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """`config.optim`: AdamW, warm-up + cosine schedule, clipping, layer-wise lr decay."""

    lr: float = 1e-4
    min_lr: float = 1e-6
    warmup_steps: int = 1000
    weight_decay: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    grad_clip: float = 1.0  # 0 = off
    layer_decay: float = 1.0  # 1 = off; fine-tuning uses < 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """`config.mesh`: device mesh axis sizes (-1 = all remaining devices)."""

    data: int = -1
    fsdp: int = 1


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """`config.wandb`: optional Weights & Biases logging beside the TensorBoard files."""

    enabled: bool = False
    project: str = "gmae_jax"
    mode: str = "online"  # 'online', 'offline' (sync later with `wandb sync`) or 'disabled'


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Top-level fields of the training stages (flat, so `--config.batch_size=256` works)."""

    seed: int = 42
    batch_size: int = 64  # global, over all devices and hosts
    num_epochs: float = 100.0
    total_steps: int = 0  # > 0 overrides num_epochs
    log_every: int = 50
    eval_every: int = 1000  # 0 = only at the end
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3  # the latest K; the best one (by best_metric) is kept besides
    # A metric of the evaluation split; the checkpoint where it was best is never deleted.
    # '' = keep only the latest K. best_mode: 'min' (loss) or 'max' (accuracy).
    best_metric: str = ""
    best_mode: str = "min"
    step_impl: str = "jit"  # 'jit' or 'shard_map'
    grad_accum_steps: int = 1
    # Rerunning a workdir that holds a run: 'check' refuses settings that change the run's shapes or
    # meaning (see gmae_jax/train/resume_check.py); 'allow_changes' records them and resumes.
    resume_policy: str = "check"


@dataclasses.dataclass(frozen=True)
class StoreView:
    """The prepare stage's fields: what a shard stores per image, a frame with shorter side `image_side`
    or a `crop_size` square around the gesture box at `crop_scale_max` (every training crop fits inside)."""

    view: str = "full_frame"
    image_side: int = 256
    crop_size: int = 320
    crop_scale_max: float = DataConfig.crop_scale_max  # keep equal to training's config.data
    jpeg_quality: int = 90


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """The pretraining stage's own top-level fields (`configs/pretrain.py`)."""

    mask_ratio: float = 0.6  # the original's pretraining script; the paper finds 0.5-0.7 best
    norm_pix_loss: bool = False  # the original predicts pixels without per-patch normalisation
    num_reconstructions: int = 8  # images in reconstructions.png


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """The fine-tuning stage's own top-level fields (`configs/finetune.py`)."""

    num_classes: int = 18  # HaGRID v1 gestures, as the original; must match the class folders
    # Workdir (or its checkpoints folder) of a pretraining run (or a fine-tuned or imported one: its
    # encoder and pos_embed); '' trains from scratch.
    init_from: str = ""
    label_smoothing: float = 0.1
    # Linear probing: train only the head on a frozen encoder (the original froze it for good; here
    # it is a choice, and the standard cheap measure of what pretraining learned).
    freeze_encoder: bool = False
    # Few-label fine-tuning: train on this many images per class of the training split, drawn with
    # subset_seed (gmae_jax/data/subsets.py); 0 = all of it. The validation split is always whole.
    labels_per_class: int = 0
    subset_seed: int = 0


Section = TypeVar("Section")


def to_config_dict(section: Any) -> ml_collections.ConfigDict:
    """A dataclass instance as a (nested) ConfigDict, for the config files."""
    return ml_collections.ConfigDict(dataclasses.asdict(section))


def read_flat(cls: type[Section], config: Any) -> Section:
    """The fields of `cls` found at the top level of `config` (e.g. LoopConfig of a training config)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return read(cls, {name: config[name] for name in names if name in config}, "config")


def read(cls: type[Section], values: Any, where: str) -> Section:
    """`values` (a ConfigDict or mapping) as a `cls`; missing fields take their defaults.

    `where` names the section in errors (e.g. 'config.data'). An unknown field is an error: it is
    nearly always a typo that would otherwise be silently ignored.
    """
    values = dict(values.items() if hasattr(values, "items") else values)
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where} has unknown field(s) {unknown}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default):
            value = read(type(default), value, f"{where}.{name}")
        kwargs[name] = value
    return cls(**kwargs)
