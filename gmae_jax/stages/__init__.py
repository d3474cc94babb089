"""The stages of `python -m gmae_jax.main --config=configs/<stage>.py`: one module per stage, each
with `run(config, workdir)` and `validate(config)` for its own config (and `check_workdir(workdir)`
where it cannot write to every kind of folder). A stage's name is its
module's name, or the module's `STAGE` where that name is a Python keyword (`import_` is 'import');
this registry is the only list of them (main and validation both use it). A stage that runs in one
process says so with `ONE_PROCESS = True`."""

from __future__ import annotations

import types
from typing import Any

import jax
import ml_collections

from gmae_jax import workdir_lock
from gmae_jax.schema import ConfigError
from gmae_jax.stages import demo, evaluate, export, finetune, import_, predict, prepare, pretrain, study
from gmae_jax.train import run_folder

STAGES: dict[str, types.ModuleType] = {
    getattr(module, "STAGE", module.__name__.rsplit(".", 1)[-1]): module
    for module in (pretrain, finetune, evaluate, predict, prepare, study, demo, export, import_)
}


def get(name: str) -> types.ModuleType:
    """The module of stage `name`."""
    if name not in STAGES:
        raise ConfigError(f"config.stage='{name}' must be one of {sorted(STAGES)}")
    return STAGES[name]


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError on the first value of `config` that its stage cannot work with."""
    stage = get(config.stage)
    try:
        stage.validate(config)
    except AttributeError as error:  # ml_collections' word for a field this config lacks
        raise ConfigError(f"config.stage='{config.stage}' but the config lacks that stage's field {error}; use "
                          f"configs/{config.stage}.py rather than another stage's config") from None


def check_process_count(config: ml_collections.ConfigDict, num_processes: int) -> None:
    """A one-process stage (predict, export, ...) in a job of several: refused before the processes
    join each other when the flags say so, else once they have (--distributed_auto)."""
    if getattr(get(config.stage), "ONE_PROCESS", False) and num_processes > 1:
        raise ConfigError(f"the {config.stage} stage runs in one process: run python -m gmae_jax.main without "
                          "--coordinator_address, --num_processes, --process_id and --distributed_auto (a "
                          "multi-process launcher such as launch/local_multiprocess.sh adds them)")


def run(config: ml_collections.ConfigDict, workdir: str) -> Any:
    """Runs the stage `config.stage` names, writing its outputs under `workdir`, which it holds
    alone for the whole run (a second run there stops with one line naming this one)."""
    stage = get(config.stage)
    check_process_count(config, jax.process_count())
    _check_outside_data(config, workdir)
    if hasattr(stage, "check_workdir"):  # before the lock, which would be the first thing written there
        stage.check_workdir(workdir)
    with workdir_lock.hold(workdir):
        return stage.run(config, workdir)


# The fields that name images a stage reads (training, evaluation, the study's unlabelled ones, predict's).
DATA_FIELDS = ("data.root", "data_root", "pretrain_data", "inputs")


def _check_outside_data(config: ml_collections.ConfigDict, workdir: str) -> None:
    """A workdir inside the data would be read as data: a class folder named like the run, its
    pictures among the images (predict's next run would predict them; in a HaGRID tree, a layout no
    longer recognised)."""
    for name in DATA_FIELDS:
        section, _, field = name.rpartition(".")
        holder = config.get(section) if section else config
        root = holder.get(field) if holder is not None else None
        if isinstance(root, str) and root and run_folder.is_inside(workdir, root):
            raise ConfigError(f"--workdir={workdir} is inside config.{name}={root}, whose images the run reads: its "
                              "files would mix with them; choose a --workdir outside the data")
