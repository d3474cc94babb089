"""Orbax checkpoints of the train state and the grain iterator, saved side by side so a resumed run
continues with exactly the batches it would have seen. A manager keeps the latest K steps and, when
given a metric, the step where that evaluation metric was best."""

from __future__ import annotations

import copy
import functools
import json
import operator
import os
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Generic, NamedTuple, TypeVar

import grain
import jax
import numpy as np
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

from gmae_jax.schema import ConfigError
from gmae_jax.train import fingerprints, orbax_noise

BEST, LATEST = "best", "latest"
DAMAGED = "damaged_checkpoints"  # beside checkpoints/: steps that failed to restore, kept for a look
DATA_ITEM = "data"  # a step's folder for the train iterator's state, one JSON file per process
FINGERPRINTS_ITEM = "fingerprints"  # a step's folder for its arrays' fingerprints, checked at restore
STATE_ITEM = "state"  # a step's folder for the train state's arrays
_UNFINISHED_SAVE = re.compile(r"\d+\.orbax-checkpoint-tmp")  # a step's folder while orbax writes it
T = TypeVar("T")


class CheckpointsUnreadableError(ConfigError):
    """No checkpoint of a run restores; the message lists each step and why."""


def make_manager(
    directory: str, max_to_keep: int, best_metric: str = "", best_mode: str = "min", read_only: bool = False,
) -> ocp.CheckpointManager:
    """Keeps the latest `max_to_keep` steps, plus the best by `best_metric` ('' = none) of the
    steps saved with metrics; `best_mode` 'min' or 'max'.

    A `read_only` manager restores on each process on its own, without orbax's barriers between
    processes (a process whose read failed would otherwise leave the others waiting in a collective
    it never joins); `newest_that_restores` makes the processes agree on the step instead."""
    policies: list[checkpoint_managers.PreservationPolicy] = [checkpoint_managers.LatestN(n=max_to_keep)]
    best_fn: Callable[[Mapping[str, float]], float] | None = None
    if best_metric:
        best_fn = operator.itemgetter(best_metric)
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=best_fn, reverse=best_mode == "min", n=1, keep_checkpoints_without_metrics=False))
    if not read_only:
        _write_replicated_arrays_whole_in_a_single_process()
    this_process = jax.process_index()
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        best_fn=best_fn, best_mode=best_mode, create=not read_only, read_only=read_only,
        **(dict(save_interval_steps=0, multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=this_process, active_processes={this_process})) if read_only else {}))
    with orbax_noise.without_log_record("Given directory is read only"):  # what we asked for, not a problem
        return ocp.CheckpointManager(_absolute(directory), options=options)


def _absolute(directory: str) -> epath.Path:
    """Orbax refuses relative paths; a `--workdir=runs/x` is relative to where the command runs."""
    return epath.Path(directory if "://" in str(directory) else os.path.abspath(directory))


@functools.cache
def _write_replicated_arrays_whole_in_a_single_process() -> None:
    """Where one process writes every byte anyway, orbax's replica-parallel saving only costs time:
    on 8 CPU devices the first save of `small`'s train state took 17.3 s instead of 5.9 s (280
    compiles) and later saves 7.2 s instead of 3.1 s (`python -m gmae_jax.bench --checkpoint_save`).
    orbax leaves it on except where JAX_PLATFORMS names a GPU, which a single-host multi-GPU run
    rarely sets. Multi-process runs keep it: it spreads their writing."""
    if jax.process_count() == 1:
        use_replica_parallel_saving(False)


def remove_unfinished_saves(directory: str) -> list[str]:
    """Removes the temporary folders of saves that a kill cut short (`<step>.orbax-checkpoint-tmp*`, up to
    a checkpoint's size each), which orbax leaves; returns their names. For a run's process 0, before
    its first save (the workdir's lock keeps other runs out): orbax's own cleanup runs in the background,
    where it deleted the first save's folder as it was written."""
    folder = _absolute(directory)
    if jax.process_index() != 0 or not folder.is_dir():
        return []
    unfinished = sorted(child.name for child in folder.iterdir() if _UNFINISHED_SAVE.match(child.name))
    for name in unfinished:
        (folder / name).rmtree()
    return unfinished


def use_replica_parallel_saving(enabled: bool) -> None:
    """orbax's replica-parallel saving on or off for this process's saves: with it, each device
    holding a copy of a replicated array writes one slice of it (what spreads the writing over the
    hosts of a multi-process run), after slicing it on the device, a compiled slice per array shape
    and device. The files are the same either way."""
    handler = copy.copy(ocp.type_handlers.get_type_handler(jax.Array))
    if not hasattr(handler, "_use_replica_parallel"):  # another orbax: leave its handler alone
        return
    handler._use_replica_parallel = enabled
    with orbax_noise.without_log_record("Type handler registry type"):  # orbax warns of any override
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def pick_step(manager: ocp.CheckpointManager, which: str) -> int | None:
    """The step of `which`: 'latest', 'best' (needs a manager made with best_metric) or a number."""
    if which == LATEST:
        return manager.latest_step()
    if which == BEST:
        return manager.best_step()
    step = int(which)
    return step if step in manager.all_steps() else None


class _IteratorSnapshot:
    """The iterator's state frozen at save time. Orbax may run grain's handler on a background
    thread, by which time the train loop has drawn more batches; grain writes `get_state()` bytes
    verbatim (one file per process), and `restore` hands them back to the live iterator."""

    def __init__(self, iterator: Any):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None,
    metrics: Mapping[str, float] | None = None,
) -> bool:
    """Asynchronous save; orbax writes to a temporary folder and renames, so a kill mid-save never
    leaves a checkpoint that looks complete. `metrics` (this step's evaluation) rank it for 'best'.
    Returns whether orbax started the save (it declines a step not newer than the latest saved)."""
    items = {STATE_ITEM: ocp.args.StandardSave(state), FINGERPRINTS_ITEM: ocp.args.JsonSave(fingerprints.of(state))}
    if data_iterator is not None:
        items[DATA_ITEM] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    return manager.save(step, args=ocp.args.Composite(**items), metrics=dict(metrics) if metrics else None)


def save_again_with_metrics(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None,
                            metrics: Mapping[str, float]) -> None:
    """Saves `step` (the latest on disk, restored into `state`) again, with the metrics its first save
    lacked, so that 'best' ranks it. A kill in between costs the steps since the one before it, nothing
    else: a rerun resumes from that one."""
    manager.wait_until_finished()
    manager.delete(step)
    save(manager, step, state, data_iterator, metrics)
    manager.wait_until_finished()


class SavedArraysMismatchError(ConfigError):
    """A step's saved arrays are not the ones the model asks for: the run's config.json describes
    another model (edited, or copied from another run). Not damage: no other step would do better."""


def array_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'params/encoder/...' -> shape, for a train state, Weights or a checkpoint's metadata tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {fingerprints.array_name(path): tuple(leaf.shape) for path, leaf in leaves}


def shape_differences(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], have_is: str,
                      want_is: str, shown: int = 3) -> str:
    """The first `shown` arrays (of `array_shapes`) whose shapes differ or that one side lacks, named
    `have_is` and `want_is` (e.g. 'saved' / 'wanted'), and how many more."""
    differences = [f"{name}: {have.get(name, 'absent')} {have_is}, {want.get(name, 'absent')} {want_is}"
                   for name in sorted(set(have) | set(want)) if have.get(name) != want.get(name)]
    more = f"; and {len(differences) - shown} more" if len(differences) > shown else ""
    return "; ".join(differences[:shown]) + more


def check_saved_arrays(manager: ocp.CheckpointManager, step: int, abstract: Any) -> None:
    """Raises SavedArraysMismatchError when step's saved state lacks an array of `abstract`, has
    another shape for one, or holds more under the same top-level fields (e.g. a deeper encoder):
    orbax would restore a partial tree, or fail as if the step were damaged. Reads metadata only."""
    saved_tree = ocp.PyTreeCheckpointer().metadata(epath.Path(manager.directory) / str(step) / STATE_ITEM)
    if getattr(getattr(saved_tree, "item_metadata", None), "tree", None) is None:  # damage, not a mismatch
        raise ValueError(f"the metadata of its arrays ({STATE_ITEM}/_METADATA, manifest.ocdbt) is missing or "
                         "unreadable")
    saved, wanted = array_shapes(saved_tree.item_metadata.tree), array_shapes(abstract)
    fields = {name.split("/")[0] for name in wanted}
    saved = {name: shape for name, shape in saved.items() if name.split("/")[0] in fields}
    if saved == wanted:
        return
    raise SavedArraysMismatchError(
        f"checkpoint step {step} in {manager.directory} does not hold the model its run's config.json describes "
        f"({shape_differences(saved, wanted, 'saved', 'wanted')}); was config.json edited, or copied from another "
        "run? Put back the one the run wrote")


def restore(
    manager: ocp.CheckpointManager, state_template: Any, data_iterator: Any | None, step: int | None = None
) -> Any:
    """Restores the latest (or given) step onto the layout and shardings of `state_template`.

    The iterator, if given, is restored in place.
    """
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    check_saved_arrays(manager, step, abstract)
    restore_args = ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
    state = check_fingerprints(manager, step, manager.restore(step, args=restore_args)[STATE_ITEM])
    if data_iterator is not None:
        data_iterator.set_state(iterator_state(epath.Path(manager.directory) / str(step)))
    return state


def iterator_state(step_folder: epath.Path) -> bytes:
    """This process's saved iterator state (what grain's handler wrote for it). After a change of
    process count that file does not exist; the position is the same in every process's file (the
    train iterator counts batches, one per step in every process, and global batch i holds the same
    examples for any process count), so the saving run's process 0's is taken."""
    folder = step_folder / DATA_ITEM
    own = folder / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if own.exists():
        return own.read_bytes()
    other_counts = sorted(folder.glob("process_0-of-*.json"))
    if not other_counts:
        raise FileNotFoundError(f"{own} does not exist")
    return other_counts[0].read_bytes()


def reason(error: Exception) -> str:
    """One line on why a step did not restore, short enough for a log line. Tensorstore nests its
    causes ('CODE: Error opening "cast" driver: ... : the cause [tensorstore_spec=...]'): keep the
    code and the innermost two (which file, what is wrong with it), drop the spec (and the repr of a
    method that orbax appends to errors reading an array)."""
    first = (str(error).strip().splitlines() or [""])[0].split(" [tensorstore_spec")[0]
    first = first.split(" See full TensorStore details")[0]  # a repr of a bound method follows
    parts = first.split(": ")
    if len(first) > 200 and len(parts) > 3:
        first = ": ".join([parts[0], "...", *parts[-2:]])
    return f"{type(error).__name__}: {first[:400]}"


def describe(failures: list[tuple[int, str]]) -> str:
    """'step 6: why; step 3: why', for one-line messages."""
    return "; ".join(f"step {step}: {why}" for step, why in failures)


def why_not_everywhere(why: str) -> str:
    """With several processes, a step counts as restored only where every process restored it:
    one host's failed read (a flaky link to the bucket) must not leave it on an older step than
    the others. Returns this process's reason ('' = restored), or, where this process did restore
    the step, which process did not. Every process must call it for the same steps."""
    if jax.process_count() == 1:
        return why
    failed = multihost_utils.process_allgather(np.int32(bool(why)))
    if why or not failed.any():
        return why
    return f"process {int(np.argmax(failed))} of {jax.process_count()} could not restore it"


class Attempt(NamedTuple, Generic[T]):
    """One step's restore on every process: its result, or why not ('' = restored) and this
    process's exception, if it had one."""

    result: T | None
    why: str
    error: Exception | None


def try_everywhere(restore_one: Callable[[int], T], step: int) -> Attempt[T]:
    """`restore_one(step)` with orbax's abandoned reads kept quiet, agreed between processes."""
    result, error = None, None
    try:
        with orbax_noise.quiet_abandoned_reads():
            result = restore_one(step)
    except SavedArraysMismatchError:
        raise  # the same in every process and for every step: not damage
    except _AgreedFailure as failure:  # the processes already agreed on it (check_fingerprints)
        return Attempt(None, str(failure), failure.__cause__ or failure)
    except Exception as failure:  # noqa: BLE001 - a damaged step on disk, whatever orbax raises for it
        error = failure
    why = why_not_everywhere(reason(error) if error else "")
    return Attempt(None if why else result, why, error)


def newest_that_restores(
    directory: str, steps: Iterable[int], restore_one: Callable[[int], T], advice: str,
) -> tuple[T | None, int | None, list[tuple[int, str]]]:
    """Calls `restore_one(step)` on `steps` newest first until one returns (the others are damaged
    on disk), logging a warning for each failure; with several processes, only a step that every
    process restored counts. Returns (its result, its step, [(newer step that failed, why)]); (None,
    None, []) when there are no steps. Raises CheckpointsUnreadableError,
    ending with `advice` (what to do), when none restores. Reads only: moves nothing."""
    failures: list[tuple[int, str]] = []
    for step in sorted(steps, reverse=True):
        attempt = try_everywhere(restore_one, step)
        if not attempt.why:
            return attempt.result, step, failures
        failures.append((step, attempt.why))
        logging.warning("checkpoint step %d in %s could not be restored (%s); trying the previous one",
                        step, directory, attempt.why)
    if failures:
        raise CheckpointsUnreadableError(
            f"none of the checkpoints in {directory} can be restored ({describe(failures)}); {advice}")
    return None, None, failures


def restore_last_good(
    manager: ocp.CheckpointManager, state_template: Any, data_iterator: Any | None,
) -> tuple[Any, int | None, list[tuple[int, str]]]:
    """Restores the newest step that restores, trying older ones after a failure (a checkpoint
    damaged on disk). Returns (state, its step, [(newer step that failed, why)]); (template, None,
    []) when there is no checkpoint. Raises CheckpointsUnreadableError when none restores."""
    reader = make_manager(str(manager.directory), max_to_keep=1, read_only=True)
    try:
        state, step, failures = newest_that_restores(
            manager.directory, reader.all_steps(),
            lambda step: restore(reader, state_template, data_iterator, step),
            advice="move that folder away to train from scratch, or use another --workdir")
    finally:
        reader.close()
    return (state_template if step is None else state), step, failures


def set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> epath.Path:
    """Moves damaged step folders to <workdir>/damaged_checkpoints/<step> (nothing is deleted), so
    the resumed run can save those steps again; returns that folder."""
    directory = epath.Path(manager.directory)
    target = directory.parent / DAMAGED
    if jax.process_index() == 0:
        target.mkdir(parents=True, exist_ok=True)
        for step in steps:
            destination = target / str(step)
            suffix = 1
            while destination.exists():
                destination, suffix = target / f"{step}.{suffix}", suffix + 1
            (directory / str(step)).rename(destination)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("checkpoint.set_aside")
    manager.reload()
    return target


def restore_weights(manager: ocp.CheckpointManager, step: int, abstract: Any) -> Any:
    """Restores only the leaves of `abstract` (e.g. step, params, batch_stats: no optimiser state,
    no data iterator) from the saved train state, with the shardings `abstract` carries."""
    check_saved_arrays(manager, step, abstract)
    restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
    item = ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args, partial_restore=True)
    restored = manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: item}))[STATE_ITEM]
    return check_fingerprints(manager, step, restored)


class DamagedArraysError(ValueError):
    """A step's arrays restored with other values than were saved: their data changed on disk."""


class _AgreedFailure(Exception):
    """A step that did not restore on some process, already agreed between the processes."""


def _saved_fingerprints(manager: ocp.CheckpointManager, step: int) -> dict[str, str] | None:
    """What the step's save wrote beside its arrays; None for a step saved before fingerprints were."""
    if not (epath.Path(manager.directory) / str(step) / FINGERPRINTS_ITEM).exists():
        return None
    saved = manager.restore(step, args=ocp.args.Composite(**{FINGERPRINTS_ITEM: ocp.args.JsonRestore()}))
    if not isinstance(saved[FINGERPRINTS_ITEM], dict):
        raise DamagedArraysError(f"{FINGERPRINTS_ITEM}/ holds no fingerprints")
    return saved[FINGERPRINTS_ITEM]


def check_fingerprints(manager: ocp.CheckpointManager, step: int, restored: Any) -> Any:
    """`restored` (all or some of step's saved state), once its arrays' fingerprints are those saved
    with them; raises DamagedArraysError otherwise. Steps saved before fingerprints were pass as they are.

    With several processes the sums of an array spread over them are collectives, which a process whose
    read failed would never join: the processes first agree that each restored the step and read its
    fingerprints (the same agreement `try_everywhere` makes for a process whose read failed)."""
    saved, error = None, None
    try:
        saved = _saved_fingerprints(manager, step)
    except Exception as failure:  # noqa: BLE001 - damaged or unreadable, as the arrays could be
        error = failure
    why = why_not_everywhere(reason(error) if error else "")
    if why:
        if error is not None and jax.process_count() == 1:
            raise error
        raise _AgreedFailure(why) from error
    if saved is None:
        return restored
    if changed := fingerprints.differing(saved, fingerprints.of(restored)):
        more = f"; and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise DamagedArraysError(f"the data of {'; '.join(changed[:3])}{more} changed on disk since the save")
    return restored
