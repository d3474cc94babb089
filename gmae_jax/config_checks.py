"""The checks of a config's values that turn a bad one into a one-line error (naming the field and
what it takes) before anything compiles or reads data; the stages run them first."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import ml_collections
from absl import logging as absl_logging

from gmae_jax import host_resources, schema
from gmae_jax.data.class_folders import EXPECTED_LAYOUT
from gmae_jax.models.fast_conv import CONV_IMPLS
from gmae_jax.models.presets import MASK_MODES, REMAT_MODES, ffn_hidden_dim
from gmae_jax.schema import ConfigError
from gmae_jax.train.divergence import TrainingDivergedError
from gmae_jax.train.resume_check import RESUME_POLICIES

STEP_IMPLS = ("jit", "shard_map")  # see gmae_jax.train.sharding.make_train_step


def check(condition: bool, message: str) -> None:
    """Raises ConfigError(message) unless `condition`; every validator words its own message."""
    if not condition:
        raise ConfigError(message)


class _RenameFields(logging.Filter):
    """Rewrites the config fields a warning names (absl's records) with `rename`."""

    def __init__(self, rename: Callable[[str], str]):
        super().__init__()
        self.rename = rename

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            message = record.getMessage()
            renamed = self.rename(message)
            if renamed != message:
                record.msg, record.args = renamed, None
        return True


@contextlib.contextmanager
def fields_named_under(section: str, renamed: Mapping[str, str] | None = None) -> Iterator[None]:
    """Errors and warnings of a stage's config validated or run as a section of another (the demo's and
    the study's recipes) name its fields as that config's flags do: `config.batch_size` ->
    `config.pretrain.batch_size`. `renamed` maps a field prefix to where the outer config holds it
    instead (e.g. 'data.' -> 'data.')."""

    def outer_field(match: re.Match) -> str:
        dashes, field = match.group(1) or "", match.group(2)
        for old, new in (renamed or {}).items():
            if field.startswith(old):
                return f"{dashes}config.{new}{field[len(old):]}"
        return f"{dashes}config.{section}.{field}"

    def rename(text: str) -> str:
        return re.sub(r"(?<![\w./])(--)?config\.(?!json\b|history\.jsonl\b)(\w+(?:\.\w+)*)", outer_field, text)

    warnings = _RenameFields(rename)
    absl_logging.get_absl_logger().addFilter(warnings)
    try:
        yield
    except (ConfigError, TrainingDivergedError) as error:
        raise type(error)(rename(str(error))) from None
    finally:
        absl_logging.get_absl_logger().removeFilter(warnings)


_POSITIVE_MODEL_FIELDS = ("img_size", "patch_size", "embed_dim", "num_heads", "depth", "decoder_embed_dim",
                          "decoder_num_heads", "mlp_ratio")


def validate_model(model: ml_collections.ConfigDict) -> None:
    for name in _POSITIVE_MODEL_FIELDS:
        check(model[name] > 0, f"config.model.{name}={model[name]} must be positive")
    check(math.isfinite(model.mlp_ratio) and ffn_hidden_dim(min(model.embed_dim, model.decoder_embed_dim),
                                                             model.mlp_ratio) >= 3,
          f"config.model.mlp_ratio={model.mlp_ratio} must be finite and give MSC-FFN a hidden width of 3 or "
          "more (its three dilated branches): width x ratio >= 1")
    check(0.0 <= model.attention_dropout < 1.0,
          f"config.model.attention_dropout={model.attention_dropout} must be in [0, 1): a probability (0 = off)")
    check(model.decoder_depth >= 0, f"config.model.decoder_depth={model.decoder_depth} must be >= 0 "
          "(0: the decoder is its embedding and prediction layers alone)")
    check(model.in_channels == 3,
          f"config.model.in_channels={model.in_channels}: the input pipeline hands on RGB images (greyscale and "
          "other modes are converted), so keep 3")
    check(model.img_size % model.patch_size == 0,
          f"config.model.img_size={model.img_size} is not divisible by config.model.patch_size="
          f"{model.patch_size}; choose an image size that is a multiple of the patch size")
    for prefix in ("", "decoder_"):
        dim, heads = model[f"{prefix}embed_dim"], model[f"{prefix}num_heads"]
        check(dim % heads == 0,
              f"config.model.{prefix}num_heads={heads} does not divide config.model.{prefix}embed_dim="
              f"{dim}; pick a head count that divides the width")
        check(dim % 16 == 0,
              f"config.model.{prefix}embed_dim={dim} must be a multiple of 16 (MSDC's four branches "
              "and its squeeze-excite reduction of 16)")
    check(not model.overlap_patches or model.patch_size % 2 == 0,
          f"config.model.overlap_patches needs an even patch size, got {model.patch_size}")
    check(model.mask_mode in MASK_MODES,
          f"config.model.mask_mode='{model.mask_mode}' is not one of {MASK_MODES}")
    check(model.dtype in ("float32", "bfloat16", "float16"),
          f"config.model.dtype='{model.dtype}' must be float32, bfloat16 or float16")
    check(model.dtype != "float16" or jax.default_backend() != "cpu",
          "config.model.dtype='float16' does not run on CPU (XLA:CPU has no float16 matmul that accumulates in "
          "float32); use bfloat16 or float32 there")
    check(model.remat in REMAT_MODES, f"config.model.remat='{model.remat}' is not one of {REMAT_MODES}")
    check(model.conv_impl in CONV_IMPLS,
          f"config.model.conv_impl='{model.conv_impl}' is not one of {CONV_IMPLS}")


def not_a_folder(path: str) -> str:
    """Why `path`, given where a folder belongs, is none: 'is a file' or 'does not exist'."""
    return "is a file" if os.path.exists(path) else "does not exist"


def check_seed(value: Any, field: str) -> None:
    """A seed numpy and grain take: a whole number in [0, 2**32)."""
    check(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32,
          f"config.{field}={value!r} must be a whole number in [0, 2**32)")


# A training step is counted in an int32 (the train state's `step`, orbax's step numbers).
MAX_STEPS = 2**31
# Worker processes per core that a worker count may ask for: more than one per core helps where the
# workers wait on storage (a bucket), but each is a process with its own batches in memory.
MAX_WORKERS_PER_CORE = 4


def check_num_workers(value: int, field: str) -> None:
    """A worker count as the input pipeline (`input_workers.worker_count`) or the prepare stage takes it: -1,
    0, or up to MAX_WORKERS_PER_CORE processes per core this process may use."""
    check(value >= -1, f"config.{field}={value} must be >= 0 (0 = in this process) or -1 (a worker per core)")
    most = MAX_WORKERS_PER_CORE * host_resources.usable_cores()
    check(value <= most, f"config.{field}={value} is more than {MAX_WORKERS_PER_CORE} worker processes per core "
          f"(this process may use {most // MAX_WORKERS_PER_CORE}): use at most {most}, or -1 (a worker per core)")


# Evaluation metrics where lower is better; the others (accuracies, F1 scores) are higher-better.
LOWER_IS_BETTER = ("loss", "cross_entropy")


def check_best_metric(loop: schema.LoopConfig, metrics: tuple[str, ...]) -> None:
    """`config.best_metric` names a metric the run's evaluation reports, ranked the right way round."""
    check(loop.best_metric in ("",) + metrics,
          f"config.best_metric='{loop.best_metric}' must be '' or one of {metrics}")
    right = "min" if loop.best_metric in LOWER_IS_BETTER else "max"
    check(not loop.best_metric or loop.best_mode == right,
          f"config.best_mode='{loop.best_mode}' would keep the checkpoint of the worst {loop.best_metric}; "
          f"use --config.best_mode={right}")


def validate_augment(aug: schema.AugmentConfig) -> None:
    """The ranges torchvision's RandomResizedCrop and ColorJitter accept, checked before any worker
    starts (a worker would otherwise fail on its first image, or train on inverted colours)."""
    check(0.0 < aug.crop_scale_min <= 1.0,
          f"config.data.aug.crop_scale_min={aug.crop_scale_min} must be in (0, 1]: the smallest crop's share "
          "of the image area (1 = no random crop)")
    for name in ("brightness", "contrast", "saturation"):
        strength = getattr(aug, name)
        check(0.0 <= strength < math.inf,
              f"config.data.aug.{name}={strength} must be >= 0 and finite: factors are drawn from [1 - x, 1 + x] "
              "(0 = off)")
    check(0.0 <= aug.hue <= 0.5,
          f"config.data.aug.hue={aug.hue} must be in [0, 0.5]: the hue shift in turns either way (0 = off)")


def validate_data(data: schema.DataConfig) -> None:
    """The numeric ranges of `config.data`, checked before a worker meets them on its first image."""
    check(1.0 <= data.crop_scale_max < math.inf,
          f"config.data.crop_scale_max={data.crop_scale_max} must be >= 1 and finite: a hand crop's side is the "
          "gesture box's times U(1, this)")
    check(0.0 <= data.no_gesture_prob <= 1.0,
          f"config.data.no_gesture_prob={data.no_gesture_prob} must be in [0, 1]: a chance")
    check(0.0 < data.v1_val_fraction < 1.0,
          f"config.data.v1_val_fraction={data.v1_val_fraction} must be in (0, 1): HaGRID v1's users held out "
          "for 'val'")
    check_seed(data.split_seed, "data.split_seed")
    check(data.max_bad_images >= 0, f"config.data.max_bad_images={data.max_bad_images} must be >= 0")
    check(0.0 <= data.max_dropped_fraction <= 1.0,
          f"config.data.max_dropped_fraction={data.max_dropped_fraction} must be in [0, 1]")
    for name in ("train_split", "eval_split"):
        check(bool(getattr(data, name).strip()), f"config.data.{name} is empty; name a split folder (e.g. "
              f"--config.data.{name}={getattr(schema.DataConfig, name)})")


WANDB_MODES = ("online", "offline", "disabled")


def _importable(name: str) -> bool:
    if name in sys.modules:  # None there: an import that failed or was blocked
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def validate_wandb(wandb: schema.WandbConfig) -> None:
    """Before the run folder is written: its files would otherwise be there when the logger fails."""
    if not wandb.enabled:
        return
    check(wandb.mode in WANDB_MODES, f"config.wandb.mode='{wandb.mode}' must be one of {WANDB_MODES}")
    check(_importable("wandb"), "config.wandb.enabled=True but the wandb package is not installed; pip install wandb "
          "or set --config.wandb.enabled=False")


def validate_training(config: ml_collections.ConfigDict) -> None:
    """The values pretrain and finetune share (the data folder is `check_data_root`'s, which the stages
    check after every value: a bad value is named even where the data is not there yet)."""
    validate_model(config.model)
    loop = schema.read_flat(schema.LoopConfig, config)
    optim = schema.read(schema.OptimConfig, config.optim, "config.optim")
    data = schema.read(schema.DataConfig, config.data, "config.data")
    check_seed(loop.seed, "seed")
    check(loop.batch_size > 0, f"config.batch_size={loop.batch_size} must be positive")
    check(0 <= loop.total_steps < MAX_STEPS,
          f"config.total_steps={loop.total_steps} must be in [0, 2**31) (0 = from config.num_epochs)")
    check(math.isfinite(loop.num_epochs), f"config.num_epochs={loop.num_epochs} must be finite")
    check(loop.total_steps > 0 or loop.num_epochs > 0,
          "set config.total_steps or config.num_epochs to a positive number")
    check(loop.keep_checkpoints >= 1,
          f"config.keep_checkpoints={loop.keep_checkpoints} must be at least 1: the latest checkpoint is what a "
          "rerun resumes from (the best one is kept besides)")
    for name in ("log_every", "checkpoint_every"):
        check(getattr(loop, name) >= 1, f"config.{name}={getattr(loop, name)} must be at least 1 (the run logs and "
              "saves at its last step anyway: a value above total_steps means only there)")
    check(loop.eval_every >= 0, f"config.eval_every={loop.eval_every} must be 0 (only at the end) or more")
    check(loop.best_mode in ("min", "max"), f"config.best_mode='{loop.best_mode}' must be 'min' or 'max'")
    check(loop.step_impl in STEP_IMPLS, f"config.step_impl='{loop.step_impl}' must be one of {STEP_IMPLS}")
    check(loop.grad_accum_steps >= 1 and loop.batch_size % loop.grad_accum_steps == 0,
          f"config.grad_accum_steps={loop.grad_accum_steps} must be a positive divisor of "
          f"config.batch_size={loop.batch_size}")
    per_step = jax.device_count() * loop.grad_accum_steps  # each device's share of every micro-batch
    check(loop.batch_size % per_step == 0,
          f"config.batch_size={loop.batch_size} is not divisible by the {jax.device_count()} devices x "
          f"config.grad_accum_steps={loop.grad_accum_steps}; use a multiple of {per_step}")
    check(loop.resume_policy in RESUME_POLICIES,
          f"config.resume_policy='{loop.resume_policy}' must be one of {RESUME_POLICIES}")
    check(0 < optim.lr < math.inf, f"config.optim.lr={optim.lr} must be positive and finite")
    check(math.isfinite(optim.weight_decay), f"config.optim.weight_decay={optim.weight_decay} must be finite")
    check(0.0 < optim.layer_decay <= 1.0,
          f"config.optim.layer_decay={optim.layer_decay} must be in (0, 1] (1 = off)")
    check(0.0 <= optim.min_lr <= optim.lr,
          f"config.optim.min_lr={optim.min_lr} must be in [0, config.optim.lr={optim.lr}]: where the cosine ends")
    for name in ("b1", "b2"):
        check(0.0 <= getattr(optim, name) < 1.0,
              f"config.optim.{name}={getattr(optim, name)} must be in [0, 1): AdamW's moment decay")
    for name in ("warmup_steps", "weight_decay", "grad_clip"):
        check(getattr(optim, name) >= 0, f"config.optim.{name}={getattr(optim, name)} must be >= 0 (0 = off)")
    validate_data(data)
    validate_augment(data.aug)
    check_num_workers(data.num_workers, "data.num_workers")
    if "wandb" in config:
        validate_wandb(schema.read(schema.WandbConfig, config.wandb, "config.wandb"))


def check_data_root(root: str) -> None:
    """A training run's data folder exists (a bucket is read, not checked, here)."""
    check(os.path.isdir(root) or "://" in root,
          f"config.data.root='{root}' {not_a_folder(root)}; point --config.data.root at a folder laid out as "
          f"{EXPECTED_LAYOUT}")
