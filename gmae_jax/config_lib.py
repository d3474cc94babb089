"""Helpers for the ml-collections configs in `configs/`: variant parsing, model presets, and the
validation that turns a bad value into a one-line error before anything compiles."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import ml_collections

from gmae_jax.models.presets import MASK_MODES, PRESETS, REMAT_MODES, GMSTConfig

STAGES = ("pretrain", "finetune", "evaluate", "demo", "prepare")
STEP_IMPLS = ("jit", "shard_map")  # see gmae_jax.train.sharding.make_train_step


class ConfigError(ValueError):
    """A config value that cannot work; the message says which field and what to change."""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses the text after ':' in `--config=file.py:model=small,runlocal` into typed values.

    A bare name sets a boolean default to True; values take the type of their default.
    """
    values = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        if key not in defaults:
            raise ConfigError(f"unknown config variant '{key}'; known: {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            values[key] = True
        elif isinstance(default, bool):
            values[key] = raw.lower() in ("1", "true", "yes")
        else:
            values[key] = type(default)(raw)
    return ml_collections.ConfigDict(values)


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
    """All architecture fields of `preset` (see `gmae_jax.models.presets`), so each is overridable."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown model preset '{preset}'; choose one of {sorted(PRESETS)}")
    fields = dataclasses.asdict(GMSTConfig())
    fields.update(PRESETS[preset])
    fields.update(overrides)
    return ml_collections.ConfigDict({"preset": preset, **fields})


def data_config(root: str, crop_scale_min: float) -> ml_collections.ConfigDict:
    """The `config.data` section shared by the training stages."""
    data = ml_collections.ConfigDict()
    data.root = root
    # 'auto' detects from the folders under root; or force 'class_folders' (<root>/{train,val}/<class>),
    # 'hagrid_v2', 'hagrid_v1' (train/val = ann_train_val re-split by user, test = ann_test) or
    # 'prepared' (a corpus folder written by configs/prepare.py: <out>/pretrain or <out>/finetune).
    data.layout = "auto"
    # HaGRID only: 'full_frame' (letterboxed frame) or 'hand_crop' (square around the gesture box).
    data.mode = "full_frame"
    data.crop_scale_max = 2.0  # hand_crop: training crop side = box side x U(1, this); eval 1.0
    data.no_gesture_prob = 0.0  # hand_crop: chance to crop a free no_gesture hand instead
    data.v1_val_fraction = 0.2  # HaGRID v1: users of ann_train_val held out for 'val'
    data.split_seed = 0  # HaGRID v1: seed of that user split
    # Unreadable images met in training are logged and replaced by the next one (left out of
    # evaluation); more than this many per loader process stops the run with an error.
    data.max_bad_images = 100
    data.train_split = "train"
    data.eval_split = "val"
    data.num_workers = 4  # grain worker processes; 0 = in the main process
    data.aug = ml_collections.ConfigDict(dict(
        crop_scale_min=crop_scale_min, hflip=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1))
    return data


def make_runlocal(config: ml_collections.ConfigDict) -> None:
    """The `runlocal` variant: the micro model for a few steps in the main process (smoke tests)."""
    config.model = model_config("micro")
    config.data.num_workers = 0
    config.batch_size = 16
    config.total_steps = 20
    config.optim.warmup_steps = 5
    config.log_every = 5
    config.eval_every = 10
    config.checkpoint_every = 10


def load_sibling_config(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of another file in the same configs folder (how demo.py reuses the stages)."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"gmae_jax_configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_model(model: ml_collections.ConfigDict) -> None:
    _check(model.img_size % model.patch_size == 0,
           f"config.model.img_size={model.img_size} is not divisible by config.model.patch_size="
           f"{model.patch_size}; choose an image size that is a multiple of the patch size")
    for prefix in ("", "decoder_"):
        dim, heads = model[f"{prefix}embed_dim"], model[f"{prefix}num_heads"]
        _check(dim % heads == 0,
               f"config.model.{prefix}num_heads={heads} does not divide config.model.{prefix}embed_dim="
               f"{dim}; pick a head count that divides the width")
        _check(dim % 16 == 0,
               f"config.model.{prefix}embed_dim={dim} must be a multiple of 16 (MSDC's four branches "
               "and its squeeze-excite reduction of 16)")
    _check(not model.overlap_patches or model.patch_size % 2 == 0,
           f"config.model.overlap_patches needs an even patch size, got {model.patch_size}")
    _check(model.mask_mode in MASK_MODES,
           f"config.model.mask_mode='{model.mask_mode}' is not one of {MASK_MODES}")
    _check(model.dtype in ("float32", "bfloat16", "float16"),
           f"config.model.dtype='{model.dtype}' must be float32, bfloat16 or float16")
    _check(model.remat in REMAT_MODES, f"config.model.remat='{model.remat}' is not one of {REMAT_MODES}")


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    """Raises ConfigError on the first value that cannot work. Data-dependent checks (class count)
    happen when the data is scanned; the demo's data does not exist until it writes it."""
    _check(config.stage in STAGES, f"config.stage='{config.stage}' must be one of {STAGES}")
    if config.stage == "demo":
        validate(config.pretrain, check_data=False)
        validate(config.finetune, check_data=False)
        return
    if config.stage == "evaluate":
        _check(bool(config.checkpoint_dir),
               "config.checkpoint_dir is empty; set --config.checkpoint_dir=WORKDIR of a pretrain or "
               "finetune run")
        return
    if config.stage == "prepare":  # no model; gmae_jax.data.prepare checks its own fields
        return
    validate_model(config.model)
    if config.stage == "pretrain":
        _check(0.0 < config.mask_ratio < 1.0,
               f"config.mask_ratio={config.mask_ratio} must be in (0, 1), e.g. --config.mask_ratio=0.6")
    else:
        _check(config.num_classes >= 2, f"config.num_classes={config.num_classes} must be at least 2")
        _check(0.0 <= config.label_smoothing < 1.0,
               f"config.label_smoothing={config.label_smoothing} must be in [0, 1)")
    _check(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
    _check(config.step_impl in STEP_IMPLS,
           f"config.step_impl='{config.step_impl}' must be one of {STEP_IMPLS}")
    _check(config.grad_accum_steps >= 1 and config.batch_size % config.grad_accum_steps == 0,
           f"config.grad_accum_steps={config.grad_accum_steps} must be a positive divisor of "
           f"config.batch_size={config.batch_size}")
    _check(config.total_steps > 0 or config.num_epochs > 0,
           "set config.total_steps or config.num_epochs to a positive number")
    _check(config.optim.lr > 0, f"config.optim.lr={config.optim.lr} must be positive")
    _check(0.0 < config.optim.layer_decay <= 1.0,
           f"config.optim.layer_decay={config.optim.layer_decay} must be in (0, 1] (1 = off)")
    _check(not check_data or os.path.isdir(config.data.root) or "://" in config.data.root,
           f"config.data.root='{config.data.root}' does not exist; point --config.data.root at a folder "
           "laid out as <root>/{train,val}/<class>/*.jpg")
