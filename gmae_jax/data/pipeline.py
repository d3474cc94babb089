"""grain input pipelines from a `sources.Source` (or a list of `Example`s) to per-process host
batches of numpy arrays.

Everything random is keyed by (seed, global element index), so batches do not depend on the
number of workers and an iterator restored from `get_state()` continues exactly. Elements are
indices into the source, so an unreadable image can be replaced by the next one.
"""

from collections.abc import Callable, Sequence
import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import grain
import numpy as np

from gmae_jax.data import input_workers, records, sources, subsets, transforms, views
from gmae_jax.data.class_folders import Example
from gmae_jax.schema import AugmentConfig


class BadImageBudgetError(transforms.ImageDecodeError):
    """More unreadable images than config.data.max_bad_images; the message names the last one."""


class _Loader:
    """Applies a view to source[index], counting unreadable images against the source's budget.

    The set of bad files is per process (each grain worker has its own copy): the budget
    bounds what any one loader tolerates, and replacements stay deterministic.
    """

    def __init__(self, source: sources.Source, view: views.ViewConfig):
        self.source, self.view = source, view
        self._bad: set[str] = set()
        self._bad_of_class: dict[int, set[str]] = {}
        self._class_sizes: np.ndarray | None = None  # images per label, counted at the first unreadable one

    # What becomes of an unreadable image: training takes the next one instead, evaluation leaves it out.
    _INSTEAD = "replaced by the next one"

    def _count_bad(self, error: transforms.ImageDecodeError, name: str) -> None:
        if name not in self._bad:
            self._bad.add(name)
            logging.warning("Unreadable image %s (%d so far, config.data.max_bad_images=%d): %s", self._INSTEAD,
                            len(self._bad), self.source.max_bad_images, error)
        if len(self._bad) > self.source.max_bad_images:
            raise BadImageBudgetError(
                f"{len(self._bad)} unreadable images exceed config.data.max_bad_images="
                f"{self.source.max_bad_images}; last: {error}. {self._remedy()}, or raise the budget.") from error

    def _remedy(self) -> str:
        """What removes unreadable images from this kind of source."""
        if self.source.prepared:
            return "Delete the shard named and rerun the prepare stage"
        if self.source.decoded_once:
            return f"Delete {self.source.records.data_dir}/{sources.TFDS_NAME} and build it again"  # a TFDS build
        if self.source.records and isinstance(self.source[0], Example):
            return "Remove or re-save the files the warnings name"
        return "Run the prepare stage to find and drop them"

    def _count_bad_of_class(self, error: transforms.ImageDecodeError, element: views.Element) -> None:
        """Stops training when every image of a class is unreadable: each would be replaced by an image
        of another class, and the run would end as if nothing were wrong, never having seen that
        class. (Consecutive images of a class sit together, so the replacements walk through it.)"""
        if self.source.decoded_once:  # the prepare stage or a TFDS build decoded every image
            return
        label = subsets.label_of(element, self.source.view.class_names)
        bad = self._bad_of_class.setdefault(label, set())
        bad.add(views.element_name(element))
        if self._class_sizes is None:
            self._class_sizes = np.bincount(subsets.labels_of(self.source))
        if len(bad) >= self._class_sizes[label]:
            name = (self.source.view.class_names[label] if self.source.view.class_names
                    else os.path.basename(os.path.dirname(element.path)))  # a class folder's name
            raise BadImageBudgetError(
                f"every training image of class '{name}' ({len(bad)}) is unreadable, so training would never see "
                f"that class; last: {error}. {self._remedy()}") from error

    def replacing(self, index: int, view_fn: Callable[[views.Element], Any]) -> Any:
        """view_fn(source[index]), or of the next readable element if that one is unreadable."""
        n = len(self.source)
        for step in range(n):
            element = self._read((index + step) % n)
            if element is None:
                continue
            try:
                return view_fn(element)
            except transforms.ImageDecodeError as e:
                self._count_bad(e, views.element_name(element))
                self._count_bad_of_class(e, element)
        raise BadImageBudgetError(f"None of the {n} images decodes; e.g. {self._bad and min(self._bad)}.")

    def skipping(self, index: int, view_fn: Callable[[views.Element], Any]) -> Any | None:
        """view_fn(source[index]), or None (counted) if it is unreadable."""
        element = self._read(index)
        if element is None:
            return None
        try:
            return view_fn(element)
        except transforms.ImageDecodeError as e:
            self._count_bad(e, views.element_name(element))
            return None

    def _read(self, index: int) -> views.Element | None:
        """source[index], or None (counted) where its record in a prepared shard does not read."""
        try:
            return self.source[index]
        except records.UnreadableRecordError as e:
            self._count_bad(e, e.name)
            return None


class _TrainLoad(_Loader):
    """Augmented view of source[index]; a picklable random_map callable for grain workers."""

    def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, label, jitter = self.replacing(index, lambda e: views.train_view(e, self.view, rng))
        return {"image": image, "label": np.int32(label), "color_jitter": jitter}


class _EvalLoad(_Loader):
    """Evaluation view of source[index]; valid=0 with a zero image past the end (padding) or for
    an unreadable image, so it is left out of the metrics instead of counted twice. `index` (the
    example's place in the split) lets a per-example choice, such as its evaluation mask, be the
    same whatever the batch size."""

    _INSTEAD = "left out of the evaluation"

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        result = None
        if index < len(self.source):
            result = self.skipping(index, lambda e: views.eval_view(e, self.view, index))
        if result is None:
            return {
                "image": np.zeros((self.view.image_size, self.view.image_size, 3), np.uint8),
                "label": np.int32(0),
                "valid": np.float32(0),
                "index": np.int32(index),
            }
        return {"image": result[0], "label": np.int32(result[1]), "valid": np.float32(1), "index": np.int32(index)}


def check_evaluable(source: sources.Source, image_size: int) -> None:
    """Raises BadImageBudgetError if no image of an evaluation split decodes: every evaluation would
    score nothing (loss and accuracy 0.0, a minimum loss then ranked as the best checkpoint). Run
    before training, it stops at the first image that decodes, usually the split's first."""
    load = _EvalLoad(source, dataclasses.replace(source.view, image_size=image_size))
    if not len(source) or any(load(index)["valid"] for index in range(len(source))):
        return  # (an empty split is the data layout's error, named where it is opened)
    raise BadImageBudgetError(nothing_evaluable(len(source), load._remedy()))


def nothing_evaluable(num_images: int, remedy: str) -> str:
    return (f"none of the {num_images} evaluation images decodes (the warnings above name them), so an evaluation "
            f"would score nothing; {remedy}, or point config.data.eval_split (or the data root) at readable images")


def eval_example(source: sources.Source, image_size: int, index: int) -> dict[str, np.ndarray]:
    """Example `index` of an evaluation split as evaluation saw it (image, label, valid, index), e.g. to draw it."""
    return _EvalLoad(source, dataclasses.replace(source.view, image_size=image_size))(index)


def _per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by "
            f"process_count={process_count}: every process loads an equal share."
        )
    return global_batch_size // process_count


def make_train_dataset(
    examples: sources.Source | Sequence[Example],
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    aug: AugmentConfig,
    num_workers: int,
    process_index: int = 0,
    process_count: int = 1,
) -> "TrainDataset":
    """Infinite, reshuffled-each-epoch augmented batches of this process's share.

    `examples` is a Source (any layout) or a list of class-folder Examples.
    Yields {'image': uint8 (B, H, W, 3), 'label': int32 (B,), 'color_jitter': float32 (B, 8)} with
    B = global_batch_size // process_count; the train step applies the jitter on the device.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    source = sources.as_source(examples)
    view = dataclasses.replace(
        source.view, image_size=image_size, crop_scale_min=aug.crop_scale_min, hflip=aug.hflip,
        brightness=aug.brightness, contrast=aug.contrast, saturation=aug.saturation, hue=aug.hue,
    )  # fmt: skip
    load = _TrainLoad(source, view)
    ds = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()
    # Augment before slicing: the random stream is keyed by the global index, so an example
    # gets the same augmentation whatever the process count (the map is lazy either way).
    ds = ds.random_map(load, seed=seed)
    # Slice whole per-process batches, so the global batch that
    # `make_array_from_process_local_data` assembles (process 0's rows first) is row for row the
    # single-process batch: per-row randomness (masks, dropout) then matches across topologies.
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    return TrainDataset(ds, num_workers)


@dataclasses.dataclass(frozen=True)
class TrainDataset:
    """The train batches; each `iter()` starts at the first batch."""

    batches: grain.MapDataset
    num_workers: int

    def __iter__(self) -> "TrainBatches":
        return TrainBatches(self.batches, self.num_workers)


class TrainBatches:
    """An iterator over the train batches whose checkpointed state is the number of batches taken.

    grain's own state of a multi-worker iterator is one entry per worker, so it restores only into
    as many workers; batch i is the same whatever the worker count, so a count restores into any (a
    resumed run may run on another host, or with another config.data.num_workers). Reading (and the
    workers) starts at the first `next()`, so a state set before it costs nothing.
    """

    def __init__(self, batches: grain.MapDataset, num_workers: int):
        self._batches, self._num_workers = batches, num_workers
        self._taken = 0
        self._iterator: Any = None

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._iterator is None:
            self._iterator = iter(input_workers.to_iter_dataset(self._batches[self._taken:], self._num_workers))
        with input_workers.naming_dead_workers(self._num_workers):
            batch = next(self._iterator)
        self._taken += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"batches_taken": self._taken}

    def close(self) -> None:
        """Stops the workers and frees the batches they had ready in shared memory."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def set_state(self, state: dict[str, Any] | bytes | str) -> None:
        """Continue after the batches a state counts (`checkpoint.restore` passes the saved bytes)."""
        taken = batches_taken(json.loads(state) if isinstance(state, (bytes, str)) else state)
        if taken != self._taken:
            self.close()
        self._taken = taken


def batches_taken(state: dict[str, Any]) -> int:
    """The batches an iterator state has taken: `TrainBatches`' own, or grain's (checkpoints written
    before it, in the main process or by workers, which take turns, one batch each)."""
    if "batches_taken" in state:
        return int(state["batches_taken"])
    if "next_index" in state:
        return int(state["next_index"])
    if "iterators_in_use_states" in state:
        return sum(int(worker["next_index"]) for worker in state["iterators_in_use_states"])
    raise ValueError(f"not a state of the train batches' iterator (keys {sorted(state)})")


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Batches in one evaluation pass; the last one is padded, so round up."""
    return math.ceil(num_examples / global_batch_size)


def make_eval_dataset(
    examples: sources.Source | Sequence[Example],
    *,
    image_size: int,
    global_batch_size: int,
    num_workers: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """One deterministic pass in equal-shape batches; padding rows have valid=0.

    Every process yields exactly `num_eval_batches(len(examples), global_batch_size)` batches
    of {'image', 'label', 'valid', 'index'}, so multi-host evaluation stays in lockstep.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    source = sources.as_source(examples)
    padded = num_eval_batches(len(source), global_batch_size) * global_batch_size
    ds = grain.MapDataset.range(padded)
    ds = ds.map(_EvalLoad(source, dataclasses.replace(source.view, image_size=image_size)))
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    return input_workers.to_iter_dataset(ds, num_workers)
