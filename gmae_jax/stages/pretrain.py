"""The pretrain stage: masked-autoencoder pretraining of the GMST encoder (configs/pretrain.py)."""

from __future__ import annotations

import math

import ml_collections

from gmae_jax import config_checks, schema
from gmae_jax.data import sources
from gmae_jax.models import masking
from gmae_jax.train import trainer

# Evaluation metrics of a pretraining run (what config.best_metric may name).
METRICS = ("loss",)


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    config_checks.validate_training(config)
    config_checks.check(0.0 < config.mask_ratio < 1.0,
                        f"config.mask_ratio={config.mask_ratio} must be in (0, 1), e.g. --config.mask_ratio=0.6")
    check_mask_ratio(config.mask_ratio, config.model.img_size, config.model.patch_size)
    config_checks.check_best_metric(schema.read_flat(schema.LoopConfig, config), METRICS)
    config_checks.check(config.num_reconstructions >= 1,
                        f"config.num_reconstructions={config.num_reconstructions} must be at least 1: the evaluation "
                        "images drawn in reconstructions.png (at most a batch)")
    if check_data:  # the demo writes its data only when it runs
        config_checks.check_data_root(config.data.root)


def check_mask_ratio(mask_ratio: float, img_size: int, patch_size: int) -> None:
    """A ratio that hides no patch trains on a zero loss, one that hides every patch leaves the encoder
    nothing to see: both are refused for the model's actual patch count."""
    patches = (img_size // patch_size) ** 2
    config_checks.check(patches >= 2,
                        f"config.model.img_size={img_size} / patch_size={patch_size} makes one patch: masking needs "
                        "one patch hidden and one visible; use a smaller config.model.patch_size")
    hidden = masking.num_masked(patches, mask_ratio)
    config_checks.check(0 < hidden < patches,
                        f"config.mask_ratio={mask_ratio} hides {hidden} of the model's {patches} patches "
                        f"(config.model.img_size={img_size} / patch_size={patch_size}); choose a ratio in "
                        f"[{math.ceil(1e4 / patches) / 1e4:g}, {math.floor(1e4 * (patches - 1) / patches) / 1e4:g}] "
                        "so that at least one patch is hidden and one visible")  # bounds rounded inwards: both accepted


def run(config: ml_collections.ConfigDict, workdir: str, data: sources.Splits | None = None) -> dict[str, float]:
    """Trains on `data`, or on config.data opened here (the study opens it first to know the run's length)."""
    if data is None:
        data = sources.open_sources(schema.read(schema.DataConfig, config.data, "config.data"))
    return trainer.train(config, workdir, data)
