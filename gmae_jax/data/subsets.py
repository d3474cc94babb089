"""Seeded, class-balanced subsets of a labelled training split, for few-label fine-tuning.

Only the training split is ever subsampled: the evaluation split stays whole, so runs with
different label budgets are scored on the same images. The same (labels, seed) gives the same
subset on every machine, and a larger budget is not required to contain a smaller one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from gmae_jax.data import views
from gmae_jax.data.class_folders import Example
from gmae_jax.data.record_filters import gesture_label
from gmae_jax.data.sources import Source
from gmae_jax.schema import ConfigError


def label_of(element: views.Element, class_names: Sequence[str]) -> int:
    """An element's integer label, without decoding its image: an Example's own, a (HagridRecord,
    JPEG bytes or None) pair's by the view's class list."""
    if isinstance(element, Example):
        return element.label
    label = gesture_label(element[0], class_names)
    if label is None:
        raise ValueError(f"{views.element_name(element)} has no gesture label in {class_names}.")
    return label


def labels_of(source: Source) -> np.ndarray:
    """The integer label of every record of `source`, without decoding any image."""
    return np.asarray([label_of(source[index], source.view.class_names) for index in range(len(source))], np.int64)


def classes_without_images(source: Source, class_names: Sequence[str]) -> list[str]:
    """The classes of which `source` holds no image. Prepared shards and TFDS builds are not read for it
    (their labels sit in the records): their index or metadata counts each class (a prepare-stage index
    written before it did: none found)."""
    if source.decoded_once:
        counts = source.records.class_counts or {}
        return [name for name in class_names if counts and not counts.get(name)]
    present = set(labels_of(source).tolist())
    return [name for label, name in enumerate(class_names) if label not in present]


def balanced_indices(labels: np.ndarray, class_names: Sequence[str], per_class: int, seed: int) -> np.ndarray:
    """`per_class` record indices of each class drawn without replacement with `seed`, sorted.

    Each class draws from its own generator (seeded by `seed` and the class index), so one class's
    subset does not depend on how many images the other classes have.
    """
    chosen = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if not len(members):
            raise ConfigError(f"config.labels_per_class={per_class} but class '{name}' has no training image")
        if len(members) < per_class:
            raise ConfigError(
                f"config.labels_per_class={per_class} but class '{name}' has only {len(members)} training "
                f"images; use at most {len(members)} labels per class")
        rng = np.random.default_rng([seed, label])
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def class_balanced_subset(source: Source, class_names: Sequence[str], per_class: int, seed: int) -> Source:
    """`source` with `per_class` images of each class (`per_class` <= 0: all of it, unchanged)."""
    if per_class <= 0:
        return source
    indices = balanced_indices(labels_of(source), class_names, per_class, seed)
    return dataclasses.replace(source, records=[source.records[int(i)] for i in indices])
