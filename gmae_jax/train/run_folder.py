"""What a training run's workdir holds, and how stages that only read a run treat it: the names of
its files and folders, its config.json and classes.json read and checked, its checkpoint steps listed,
and the guards that keep evaluate, predict, export, prepare and import from writing into a run."""

from __future__ import annotations

import os
from typing import Any

import ml_collections
from etils import epath

from gmae_jax import run_files
from gmae_jax.schema import ConfigError
from gmae_jax.torch_mirror import export_format

CONFIG_FILE = "config.json"  # the resolved config, written before the first step
CLASSES_FILE = "classes.json"  # the class names, one per classifier output, in order
HISTORY_FILE = "config.history.jsonl"  # every resume's changes under resume_policy=allow_changes
FACTS_FILE = "run.json"  # facts a resume must find unchanged (resume_check)
METRICS_FILE = "metrics.jsonl"  # one JSON line per log or evaluation point
CHECKPOINTS = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
TRAINING_STAGES = ("pretrain", "finetune")
IMPORTED_PRESET = "imported"  # config.model.preset of a run the import stage wrote
# Inside a study's (and the demo's) workdir: its pretraining run, and a folder of its fine-tunes.
STUDY_PRETRAIN_DIR = "pretrain"
STUDY_RUNS_DIR = "runs"


def read_run_config(path: epath.Path) -> dict[str, Any]:
    """A run's config.json as written: a JSON object with the fields every run has. Anything else
    (edited by hand, another program's file) is a one-line error naming it, not an AttributeError
    later, or a resume that compares nothing."""
    values = run_files.read_json(path)
    needed = ["stage", "model", "seed"] + (["num_classes"] if isinstance(values, dict)
                                           and values.get("stage") == "finetune" else [])
    missing = [name for name in needed if not isinstance(values, dict) or name not in values]
    if missing or not isinstance(values.get("model"), dict):
        what = f"has no {', '.join(missing)}" if isinstance(values, dict) and missing else (
            "has no model section" if isinstance(values, dict) else f"holds a JSON {type(values).__name__}")
        raise ConfigError(f"{path} is no run's config (it {what}): restore it from a copy, or move the run folder "
                          "aside and start a new run")
    return values


def refuse_an_export(workdir: str) -> None:
    """An export folder (its own config.json beside PyTorch weights) where a run is wanted: say to import it."""
    if any((epath.Path(workdir) / name).exists() for name in (export_format.MODEL_PTH, export_format.SAFETENSORS)):
        raise ConfigError(f"{workdir} is an export (PyTorch weights), not a run: import it first "
                          f"(--config=configs/import.py --config.path={workdir}/{export_format.MODEL_PTH} "
                          "--workdir=NEW_RUN) and point at NEW_RUN")


def _check_a_folder(workdir: str) -> None:
    """A run's workdir that is missing or a file is named as such, not as a missing config.json in it."""
    folder = epath.Path(workdir)
    if not folder.exists():
        raise ConfigError(f"{workdir} does not exist: point at the workdir of a pretrain or finetune run")
    if not folder.is_dir():
        raise ConfigError(f"{workdir} is a file, not a run's workdir: point at the workdir of a pretrain or "
                          "finetune run")


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The resolved config a training run wrote to its workdir."""
    _check_a_folder(workdir)
    refuse_an_export(workdir)
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        raise ConfigError(f"{path} not found: point at the workdir of a pretrain or finetune run"
                          + _runs_inside(workdir))
    config = ml_collections.ConfigDict(read_run_config(path))
    if config.get("stage") not in TRAINING_STAGES:
        raise ConfigError(f"{path} is a '{config.get('stage')}' run; expected one of {TRAINING_STAGES}")
    return config


def _runs_inside(workdir: str, most: int = 3) -> str:
    """'; did you mean ...' with the runs a demo or study workdir holds (its pretrain/ and runs/*/), the
    folder a user points at first; '' where there are none."""
    folder = epath.Path(workdir)
    candidates = ([folder / STUDY_PRETRAIN_DIR, *sorted((folder / STUDY_RUNS_DIR).glob("*"))] if folder.is_dir()
                  else [])
    runs = [str(c) for c in candidates if (c / CONFIG_FILE).exists()]
    if not runs:
        return ""
    more = f" (and {len(runs) - most} more under {folder / STUDY_RUNS_DIR})" if len(runs) > most else ""
    return f"; it holds runs: did you mean {' or '.join(runs[:most])}{more}?"


def load_class_names(workdir: str, required: bool = True) -> list[str]:
    """The run's classes.json; a pretraining run's may be missing (`required=False`: no names), since
    its model has no outputs to name (a copy of config.json and checkpoints/ is enough to restore it)."""
    path = epath.Path(workdir) / CLASSES_FILE
    if not path.exists():
        _check_a_folder(workdir)
        refuse_an_export(workdir)
        if not required and (epath.Path(workdir) / CONFIG_FILE).exists():
            return []
        raise ConfigError(f"{path} not found: point at the workdir of a pretrain or finetune run"
                          + _runs_inside(workdir))
    names = run_files.read_json(path)
    repeated = repeated_names(names) if isinstance(names, list) else []
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names) or repeated:
        what = f"names {', '.join(map(str, repeated))} more than once" if repeated else "is no list of class names"
        raise ConfigError(f"{path} {what}: put back the {CLASSES_FILE} the run wrote (one name an output, in order)")
    return names


def repeated_names(names: list[str]) -> list[str]:
    """The class names given more than once: two outputs of one name could not be told apart."""
    return sorted({name for name in names if names.count(name) > 1})


def check_class_count(config: ml_collections.ConfigDict, class_names: list[str], workdir: str) -> None:
    """A classifier's classes.json names each of its outputs; another count would mislabel them."""
    if config.get("stage") == "finetune" and len(class_names) != config.num_classes:
        raise ConfigError(f"{workdir}/{CLASSES_FILE} names {len(class_names)} classes but the run's classifier has "
                          f"{config.num_classes} outputs (config.num_classes in its {CONFIG_FILE}); put back the "
                          f"{CLASSES_FILE} the run wrote")


def run_workdir(path: str) -> str:
    """A run's workdir from either the workdir or its `checkpoints` folder (what init_from held)."""
    path = str(path).rstrip("/")
    if epath.Path(path).name == CHECKPOINTS and not (epath.Path(path) / CONFIG_FILE).exists():
        return str(epath.Path(path).parent)
    return path


def checkpoint_steps(workdir: str | epath.Path) -> list[int]:
    """The step folders in a run's checkpoints/ (a listing only: nothing is restored)."""
    folder = epath.Path(workdir) / CHECKPOINTS
    return sorted(int(child.name) for child in folder.iterdir() if child.name.isdigit()) if folder.is_dir() else []


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it, links resolved."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def _run_evidence(folder: epath.Path) -> str | None:
    """What marks `folder` as a training run's: its checkpoints/, or (checkpoints moved away, as a run
    none of whose checkpoints restores is told to) the config.json a training stage wrote."""
    if (folder / CHECKPOINTS).is_dir():
        return f"its {CHECKPOINTS}/ is there"
    try:
        stage = read_run_config(folder / CONFIG_FILE).get("stage") if (folder / CONFIG_FILE).is_file() else None
    except ConfigError:  # a damaged config.json: not evidence of a run
        return None
    return f"its {CONFIG_FILE} is a {stage} run's" if stage in TRAINING_STAGES else None


def check_not_a_run(workdir: str, stage: str) -> None:
    """A stage that is no training run never writes into one (its config.json, pictures, TensorBoard),
    nor into a folder inside one (where it would pass for the run: a checkpoints/ inside checkpoints/)."""
    evidence = _run_evidence(epath.Path(workdir))
    if evidence:
        raise ConfigError(f"--workdir={workdir} holds a training run ({evidence}); {stage} never writes into a "
                          "run: choose another folder")
    check_not_inside_a_run(workdir, stage)


def check_not_inside_a_run(workdir: str, stage: str) -> None:
    """No folder above `workdir` is a training run's (local paths; a bucket has no folders to walk)."""
    if "://" in workdir:
        return
    for folder in epath.Path(os.path.abspath(workdir)).parents:
        evidence = _run_evidence(folder)
        if evidence:
            raise ConfigError(f"--workdir={workdir} is inside the training run {folder} ({evidence}); {stage} "
                              "never writes into a run: choose a folder outside it")


def check_outside_run(workdir: str, run_path: str, stage: str) -> None:
    """Stages that read a run (evaluate, predict, export) write their outputs elsewhere: in the run
    they would mix with its own files (its TensorBoard, its confusion matrix)."""
    run = run_workdir(run_path)
    if is_inside(workdir, run):
        raise ConfigError(f"--workdir={workdir} is inside the run it reads ({run}); {stage} never writes into a "
                          "run: choose another folder")
    check_not_a_run(workdir, stage)
