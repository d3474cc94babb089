"""Entry point: `python -m gmae_jax.main --config=configs/<stage>.py --workdir=DIR [--config.x=y]`."""

from __future__ import annotations

import logging as pylogging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gmae_jax import config_lib, demo, stages
from gmae_jax.data.class_folders import DataLayoutError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and pictures.")
flags.mark_flags_as_required(["config", "workdir"])

STAGE_FUNCTIONS = {
    "pretrain": stages.pretrain,
    "finetune": stages.finetune,
    "evaluate": stages.evaluate,
    "demo": demo.run,
}


class _QuietLibraries(pylogging.Filter):
    """Keeps orbax's per-save INFO chatter out of the progress output (warnings still pass)."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_QuietLibraries())
    config = _CONFIG.value
    try:
        config_lib.validate(config)
        logging.info("JAX %s on %s; process %d of %d", jax.__version__, jax.devices()[0].platform,
                     jax.process_index(), jax.process_count())
        STAGE_FUNCTIONS[config.stage](config, _WORKDIR.value)
    except (config_lib.ConfigError, DataLayoutError) as error:
        # A mistake in the config or the data folder: one line that says what to change, no trace.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
