"""Before a training run touches a workdir that already holds a run: is it the same run?

A rerun resumes from the workdir's checkpoints, so a config that changes the state's shapes or what
the run means (a wider model, another data root, another seed) would either fail half-way after
rewriting `config.json`, or silently mix two runs. Fields are classified here, once: the ones in
HARMLESS change how the run is driven, not what it computes, and may change on resume; every other
field binds the run. Allowed changes are recorded in `config.history.jsonl`.
"""

from __future__ import annotations

import datetime
import fnmatch
import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

from gmae_jax import run_files
from gmae_jax.schema import ConfigError, LoopConfig, read_flat
from gmae_jax.train.run_folder import (CLASSES_FILE, CONFIG_FILE, FACTS_FILE, HISTORY_FILE, IMPORTED_PRESET,
                                       checkpoint_steps, read_run_config)

# run.json holds what the config alone does not say about a run: the training images it read and the steps it
# planned, so a resume notices images added or removed since (another shuffle, another epoch length),
# and the view its evaluation images were seen in (the data's layout decides it, not the config alone).
TRAIN_IMAGES, PLANNED_STEPS = "data: training images", "planned total steps"
# Another evaluation split (images added, removed or replaced by the same count of others, which this
# does not see) is no other run, but scores from then on do not compare with the earlier ones.
EVAL_IMAGES = "data: evaluation images"
# How the run's images became pixels in evaluation ('original', 'full_frame' or 'hand_crop'): what
# predict and an export must do to a photo for this model.
VIEW = "data: evaluation view"
# 'check': a binding change stops the run; 'allow_changes': it is recorded and the run resumes.
RESUME_POLICIES = ("check", "allow_changes")

# Dotted field names (fnmatch patterns) that may change when a run resumes: logging, evaluation and
# checkpoint cadence, worker counts, device layout, memory knobs and how convolutions are computed (a
# checkpoint restores onto any mesh and backend), and the policy itself. Not grad_accum_steps: each
# micro-batch normalises with its own BatchNorm statistics and draws its own masks.
HARMLESS = (
    "log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "resume_policy",
    "num_reconstructions", "step_impl", "data.num_workers", "data.max_bad_images",
    "mesh.*", "wandb.*", "model.remat", "model.conv_impl",
)
# Fields that fix the saved weights, their shapes or how attention splits them into heads (other heads,
# same shapes: the weights would load and mean something else): no resume policy continues a run across them.
SHAPE_FIELDS = (
    "stage", "num_classes", "model.img_size", "model.in_channels", "model.patch_size", "model.overlap_patches",
    "model.embed_dim", "model.depth", "model.decoder_embed_dim", "model.decoder_depth", "model.mlp_ratio",
    "model.num_heads", "model.decoder_num_heads",
)
# Harmless only when they grow: a longer run continues the same one; a shorter one is another run.
UPWARD_ONLY = ("total_steps", "num_epochs")


def changes_optimiser_layout(name: str, old: Any, new: Any) -> bool:
    """Whether a change gives the optimiser state another structure, which the saved one cannot restore
    into: clipping on or off, layer-wise learning-rate decay on or off, a frozen encoder or not (optim.py)."""
    if name == "optim.grad_clip":
        return (old > 0) != (new > 0)
    if name == "optim.layer_decay":
        return (old < 1) != (new < 1)
    return name == "freeze_encoder"


Change = tuple[str, Any, Any]  # (dotted field, old value, new value)


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'depth': 2}} -> {'model.depth': 2}."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def is_harmless(name: str, old: Any, new: Any) -> bool:
    if name in UPWARD_ONLY:
        return isinstance(old, (int, float)) and isinstance(new, (int, float)) and new >= old
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in HARMLESS)


def compare(old: dict[str, Any], new: dict[str, Any]) -> tuple[list[Change], list[Change]]:
    """(binding, harmless) differences between two flattened configs. A field only one side has is
    not a difference: a run saved before that field existed reads back with its default."""
    binding, harmless = [], []
    for name in sorted(set(old) & set(new)):
        if old[name] != new[name]:
            (harmless if is_harmless(name, old[name], new[name]) else binding).append((name, old[name], new[name]))
    return binding, harmless


def imported_run_error(workdir: str, stage: str | None) -> str:
    """An imported run holds weights only (no optimiser state, no data position, no recipe): no
    training resumes it, whatever its config says; a new run starts from its encoder instead."""
    head = " (the encoder; the classifier head starts anew)" if stage == "finetune" else ""
    return (f"{workdir} holds a run the import stage wrote: weights only, with no optimiser state or data position "
            f"to resume, so no training continues it; fine-tune from it{head} with configs/finetune.py "
            f"--config.init_from={workdir} and a new --workdir (evaluate and predict read it as it is)")


def listing(changes: Sequence[Change]) -> str:
    """`name: old -> new; ...`, as the errors and the resume line spell changes."""
    return "; ".join(f"{name}: {old_value!r} -> {new_value!r}" for name, old_value, new_value in changes)


def check(config: ml_collections.ConfigDict, workdir: str, class_names: list[str],
          facts: dict[str, Any] | None = None) -> list[Change]:
    """The differences between `config` (and the run `facts`: TRAIN_IMAGES, EVAL_IMAGES, PLANNED_STEPS,
    VIEW) and the run already in `workdir` (none for a new run).

    Raises ConfigError, before anything is written, when a binding field differs and
    `config.resume_policy` is 'check'. Other training images are binding; another planned length
    follows from changes listed beside it and is recorded with them."""
    folder = epath.Path(workdir)
    saved = checkpoint_steps(folder)
    if saved and not (folder / CONFIG_FILE).exists():  # written before the first checkpoint, so lost since
        raise ConfigError(f"{workdir} holds checkpoints (steps {', '.join(map(str, saved))}) but no {CONFIG_FILE}, so "
                          "what they were trained with is unknown and nothing can check this config against it; "
                          f"put back the run's {CONFIG_FILE}, or start a new run with another --workdir")
    if not saved:
        return []  # nothing to resume: a new run (metrics of a run that never saved are dropped)
    old = flatten(read_run_config(folder / CONFIG_FILE))
    if old.get("model.preset") == IMPORTED_PRESET:
        raise ConfigError(imported_run_error(workdir, old.get("stage")))
    new = flatten(json.loads(config.to_json_best_effort()))
    binding, harmless = compare(old, new)
    old_facts = run_files.read_json(folder / FACTS_FILE) if (folder / FACTS_FILE).exists() else {}
    for name, value in (facts or {}).items():
        if name in old_facts and old_facts[name] != value:
            (binding if name == TRAIN_IMAGES else harmless).append((name, old_facts[name], value))
    classes = f"classes ({CLASSES_FILE})"
    if (folder / CLASSES_FILE).exists():
        old_classes = list(run_files.read_json(folder / CLASSES_FILE))
        if old_classes != list(class_names):
            binding.append((classes, old_classes, list(class_names)))
    listed = listing(binding)
    # A classifier's class order is what its saved outputs mean (a pretraining run's labels are unused).
    fixed = [name for name, old_value, new_value in binding
             if name in SHAPE_FIELDS or (name == classes and config.get("stage") == "finetune")
             or changes_optimiser_layout(name, old_value, new_value)]
    if fixed:
        raise ConfigError(
            f"{workdir} holds a run with other settings ({listed}); nothing was changed. {', '.join(fixed)} "
            f"{'fixes' if len(fixed) == 1 else 'fix'} its saved state (its weights' shapes, their attention heads, "
            "what a classifier's outputs mean, or how its optimiser state is laid out), so no resume can continue "
            "it with the new values: start a new run with another --workdir")
    if binding and read_flat(LoopConfig, config).resume_policy == "check":
        raise ConfigError(
            f"{workdir} holds a run with other settings ({listed}); nothing was changed. Start a new run "
            "with another --workdir, or continue this one with the new values with "
            "--config.resume_policy=allow_changes")
    return binding + harmless


def schedule_change_warning(changes: Sequence[Change], resumed_at: int,
                            warmup_steps: int) -> str | None:
    """A resume that plans another number of steps stretches (or cuts) the cosine decay: after the
    warm-up, the rates from `resumed_at` on follow the new schedule, so the run is neither a straight run
    of the old length nor one of the new (within the warm-up both schedules agree). A run resumed at or
    past its new end trains no step on it (`nothing_to_train_warning` says so)."""
    planned = [(old, new) for name, old, new in changes if name == PLANNED_STEPS]
    if not planned or resumed_at <= warmup_steps or resumed_at >= planned[0][1]:
        return None
    old, new = planned[0]
    return (f"the learning-rate schedule now decays over {new} steps instead of {old}: steps {resumed_at + 1} on "
            f"follow it, steps up to {resumed_at} followed the {old}-step one (a straight {new}-step run would have "
            "had other rates there)")


def evaluation_change_warning(changes: Sequence[Change]) -> str | None:
    """A resumed run evaluated on another number of images: its metrics.jsonl then mixes two splits."""
    counts = [(old, new) for name, old, new in changes if name == EVAL_IMAGES]
    if not counts:
        return None
    old, new = counts[0]
    return (f"the evaluation split now holds {new} images, not the {old} this run was evaluated on so far: "
            "evaluations from here on (and the best checkpoint's rank among them) do not compare with the earlier "
            "ones in metrics.jsonl; config.history.jsonl records the change")


def record(workdir: str, changes: list[Change], policy: str) -> None:
    """Appends one line with the changes to the run's config.history.jsonl (rewritten whole, as
    object stores cannot append)."""
    path = epath.Path(workdir) / HISTORY_FILE
    line = json.dumps({
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "resume_policy": policy,
        "changes": {name: {"old": old, "new": new} for name, old, new in changes},
    }, sort_keys=True)
    previous = path.read_text() if path.exists() else ""
    run_files.write_text(path, previous + line + "\n")


def recorded_view(workdir: str) -> str | None:
    """The evaluation view a run recorded in its run.json (None for runs older than the record)."""
    path = epath.Path(workdir) / FACTS_FILE
    facts = run_files.read_json(path) if path.exists() else {}
    return facts.get(VIEW) if isinstance(facts, dict) else None


def write_run_files(config: ml_collections.ConfigDict, workdir: str, class_names: list[str],
                    changes: list[Change] = (), facts: dict[str, Any] | None = None) -> None:
    """The resolved config and the class order, so `setup.restore_run` can rebuild the run, and the
    run's `facts` for the next resume check; `changes` (from `check`) go to
    config.history.jsonl."""
    if jax.process_index() != 0:
        return
    folder = epath.Path(workdir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in run_files.remove_leftovers(folder):
        logging.info("removed %s, left by a write that a kill cut short (the file it was for is whole)", name)
    if changes:
        record(workdir, list(changes), read_flat(LoopConfig, config).resume_policy)
    run_files.write_text(folder / CONFIG_FILE, config.to_json_best_effort(indent=2, sort_keys=True))
    run_files.write_text(folder / CLASSES_FILE, json.dumps(class_names, indent=1))
    if facts:
        run_files.write_text(folder / FACTS_FILE, json.dumps(facts, indent=1, sort_keys=True))
