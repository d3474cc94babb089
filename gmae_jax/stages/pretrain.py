"""The pretrain stage: masked-autoencoder pretraining of the GMST encoder (configs/pretrain.py)."""

from __future__ import annotations

import ml_collections

from gmae_jax import config_lib, schema
from gmae_jax.data import sources
from gmae_jax.train import trainer

# Evaluation metrics of a pretraining run (what config.best_metric may name).
METRICS = ("loss",)


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    config_lib.validate_training(config, check_data)
    config_lib.check(0.0 < config.mask_ratio < 1.0,
                     f"config.mask_ratio={config.mask_ratio} must be in (0, 1), e.g. --config.mask_ratio=0.6")
    config_lib.check(config.best_metric in ("",) + METRICS,
                     f"config.best_metric='{config.best_metric}' must be '' or one of {METRICS}")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    data = sources.open_sources(schema.read(schema.DataConfig, config.data, "config.data"))
    return trainer.train(config, workdir, data)
