"""grain input pipelines from `Example`s to per-process host batches of numpy arrays.

Everything random is keyed by (seed, global element index), so batches do not depend on the
number of workers and an iterator restored from `get_state()` continues exactly.
"""

from collections.abc import Sequence
import dataclasses
import math

import grain
import ml_collections
import numpy as np

from gmae_jax.data import transforms
from gmae_jax.data.class_folders import Example

_EVAL_CROP_FRACTION = 0.875
# grain's default reads 500 elements ahead per process; our elements are whole batches, so
# that would hold hundreds of batches in memory in every worker. Two in flight keep the
# consumer fed; workers (num_workers) are where the real parallelism comes from.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; an ml_collections.ConfigDict with the same fields works too."""

    crop_scale_min: float = 0.35
    hflip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1


@dataclasses.dataclass(frozen=True)
class _TrainLoad:
    """Decode, augment, normalise one example; a picklable callable for grain workers."""

    image_size: int
    crop_scale_min: float
    hflip: bool
    brightness: float
    contrast: float
    saturation: float
    hue: float

    def __call__(self, example: Example, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # Decode at a reduced JPEG scale that still leaves the smallest crop at full resolution.
        draft = math.ceil(self.image_size / math.sqrt(self.crop_scale_min))
        img = transforms.decode_rgb(example.path, draft_size=draft)
        img = transforms.random_resized_crop(
            img, self.image_size, rng, scale=(self.crop_scale_min, 1.0)
        )
        if self.hflip:
            img = transforms.horizontal_flip(img, rng)
        img = transforms.color_jitter(
            img, rng, self.brightness, self.contrast, self.saturation, self.hue
        )
        return {"image": transforms.normalize(img), "label": np.int32(example.label)}


@dataclasses.dataclass(frozen=True)
class _EvalLoad:
    """Centre view of example `index`, or a zero image with valid=0 past the end (padding)."""

    examples: tuple[Example, ...]
    image_size: int

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        if index >= len(self.examples):
            return {
                "image": np.zeros((self.image_size, self.image_size, 3), np.float32),
                "label": np.int32(0),
                "valid": np.float32(0),
            }
        example = self.examples[index]
        draft = math.ceil(self.image_size / _EVAL_CROP_FRACTION)
        img = transforms.decode_rgb(example.path, draft_size=draft)
        img = transforms.resize_center_crop(img, self.image_size, _EVAL_CROP_FRACTION)
        return {
            "image": transforms.normalize(img),
            "label": np.int32(example.label),
            "valid": np.float32(1),
        }


def _per_process_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be divisible by "
            f"process_count={process_count}: every process loads an equal share."
        )
    return global_batch_size // process_count


def _to_iter_dataset(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    ds = ds.to_iter_dataset(read_options=_READ_OPTIONS)
    if num_workers > 0:
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return ds


def make_train_dataset(
    examples: Sequence[Example],
    *,
    image_size: int,
    global_batch_size: int,
    seed: int,
    aug: AugmentConfig | ml_collections.ConfigDict,
    num_workers: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """Infinite, reshuffled-each-epoch augmented batches of this process's share.

    `aug` is an `AugmentConfig` or anything with the same attributes (a ConfigDict).
    Yields {'image': float32 (B, H, W, 3), 'label': int32 (B,)} with
    B = global_batch_size // process_count.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    load = _TrainLoad(
        image_size=image_size,
        crop_scale_min=aug.crop_scale_min,
        hflip=aug.hflip,
        brightness=aug.brightness,
        contrast=aug.contrast,
        saturation=aug.saturation,
        hue=aug.hue,
    )
    ds = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat()
    # Augment before slicing: the random stream is keyed by the global index, so an example
    # gets the same augmentation whatever the process count (the map is lazy either way).
    ds = ds.random_map(load, seed=seed)
    ds = ds[process_index::process_count]
    ds = ds.batch(batch_size, drop_remainder=True)
    return _to_iter_dataset(ds, num_workers)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Batches in one evaluation pass; the last one is padded, so round up."""
    return math.ceil(num_examples / global_batch_size)


def make_eval_dataset(
    examples: Sequence[Example],
    *,
    image_size: int,
    global_batch_size: int,
    num_workers: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
    """One deterministic pass in equal-shape batches; padding rows have valid=0.

    Every process yields exactly `num_eval_batches(len(examples), global_batch_size)` batches
    of {'image', 'label', 'valid'}, so multi-host evaluation stays in lockstep.
    """
    batch_size = _per_process_batch_size(global_batch_size, process_count)
    padded = num_eval_batches(len(examples), global_batch_size) * global_batch_size
    ds = grain.MapDataset.range(padded)[process_index::process_count]
    ds = ds.map(_EvalLoad(examples=tuple(examples), image_size=image_size))
    ds = ds.batch(batch_size, drop_remainder=True)
    return _to_iter_dataset(ds, num_workers)
