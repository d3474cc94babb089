"""The prepare stage: a raw HaGRID tree -> checked, de-duplicated, user-split ArrayRecord corpora
(the work itself is in `gmae_jax.data.prepare`; configs/prepare.py)."""

from __future__ import annotations

import math
import signal
import threading
from typing import Any

import ml_collections

from gmae_jax import config_checks, schema
from gmae_jax.data import prepare
from gmae_jax.train import run_folder
from gmae_jax.train.preemption import Preempted

ONE_PROCESS = True  # its own worker pool; processes would write the same shards
LAYOUTS = ("auto", "hagrid_v1", "hagrid_v2")  # what it reads: HaGRID's annotations name each image's person
MIN_STORED_SIDE = 32


def validate(config: ml_collections.ConfigDict) -> None:
    config_checks.check(config.view in prepare.VIEWS, f"config.view='{config.view}' must be one of {prepare.VIEWS}")
    for name in ("corpora", "splits"):
        fractions = dict(config[name])
        config_checks.check(all(f > 0 for f in fractions.values()) and math.isclose(sum(fractions.values()), 1.0),
                            f"config.{name}={fractions} must be positive fractions that sum to 1")
    config_checks.check(config.records_per_shard > 0,
                        f"config.records_per_shard={config.records_per_shard} must be positive")
    for name in ("image_side", "crop_size"):
        config_checks.check(config[name] >= MIN_STORED_SIDE,
                            f"config.{name}={config[name]} must be at least {MIN_STORED_SIDE} pixels (the smallest "
                            "model input, the micro preset's); store images at least as large as the model's input")
    config_checks.check(1.0 <= config.crop_scale_max < math.inf,
                        f"config.crop_scale_max={config.crop_scale_max} must be >= 1 and finite: a stored crop holds "
                        "the gesture box at this scale, so that every training crop (box x U(1, "
                        "config.data.crop_scale_max)) fits")
    config_checks.check(1 <= config.jpeg_quality <= 100,
                        f"config.jpeg_quality={config.jpeg_quality} must be in [1, 100]")
    config_checks.check_seed(config.seed, "seed")
    config_checks.check_num_workers(config.num_workers, "num_workers")
    config_checks.check(bool(config.data.root), "config.data.root is empty; set --config.data.root=a HaGRID tree")
    config_checks.check(config.data.layout in LAYOUTS,
                        f"config.data.layout='{config.data.layout}' must be one of {LAYOUTS}: the prepare stage splits "
                        "HaGRID by person (user_id)")
    config_checks.validate_data(schema.read(schema.DataConfig, config.data, "config.data"))


def check_workdir(workdir: str) -> None:
    """Shards are written by a local ArrayRecord writer and renamed into place, which object stores
    cannot do: a gs:// workdir is refused before anything is written, its lock included (the data
    may still be read there)."""
    config_checks.check("://" not in workdir,
                        f"--workdir={workdir}: the prepare stage writes to a local folder; prepare into one and "
                        "copy it to the bucket (gcloud storage cp -r FOLDER gs://...), then point "
                        "--config.data.root at gs://.../finetune (or .../pretrain)")
    run_folder.check_not_a_run(workdir, "the prepare stage")


def _stop(signum: int, frame: object) -> None:
    raise Preempted("prepare stopped by SIGTERM; every finished shard and decode check is kept: rerun the same "
                    "command to go on")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    check_workdir(workdir)  # a workdir inside the tree it prepares: `stages.run` refuses it
    # SIGTERM (a scheduler, `kill`) as an exception in this process: leaving the worker pool's block
    # then terminates its workers, which would otherwise go on writing into a closed pipe.
    handles = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if handles else None
    try:
        return prepare.prepare(config, workdir)
    finally:
        if handles:
            signal.signal(signal.SIGTERM, previous)
