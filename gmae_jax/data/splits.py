"""User-disjoint, class-stratified splits: a person seen in training is never evaluated on.

Used for pretrain / fine-tune (70 / 30) and train / val (/ test). Whole users are assigned
greedily, largest first, each to the side that most needs that user's images: for side s
with fraction f_s, the need is sum over the user's classes c of n_uc * (f_s * N_c - A_sc) / N_c
(N_c: images of class c, A_sc: already given to s). So per-class proportions approach the
fractions, big users are placed while there is room to correct, and a seeded shuffle breaks
ties between equal-sized users so that the seed alone decides the split.
"""

import collections
from collections.abc import Callable, Hashable, Mapping, Sequence
import math
from typing import Protocol, TypeVar

from absl import logging
import numpy as np


class _HasUser(Protocol):
    user_id: str


R = TypeVar("R", bound=_HasUser)


class UserOverlapError(ValueError):
    """A user_id appears on two sides of a split; the message names it."""


def _check_fractions(fractions: Mapping[str, float]) -> None:
    if not fractions or any(f <= 0 for f in fractions.values()):
        raise ValueError(f"fractions must be positive and non-empty, got {dict(fractions)}.")
    if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise ValueError(f"fractions must sum to 1, got {dict(fractions)}.")


def split_by_user(
    records: Sequence[R],
    fractions: Mapping[str, float],
    seed: int,
    stratify_by: Callable[[R], Hashable] | None = None,
) -> dict[str, list[R]]:
    """side -> records (in input order), no user on two sides; see the module docstring.

    `stratify_by` gives each record's class (any hashable, None included); without it only
    the overall sizes are balanced.
    """
    _check_fractions(fractions)
    key = stratify_by or (lambda record: None)
    classes = [key(r) for r in records]
    by_user: dict[str, list[int]] = collections.defaultdict(list)
    for i, record in enumerate(records):
        by_user[record.user_id].append(i)
    users = sorted(by_user)
    users = [users[i] for i in np.random.default_rng(seed).permutation(len(users))]
    users.sort(key=lambda u: -len(by_user[u]))  # stable: equal sizes keep the seeded order

    totals = collections.Counter(classes)
    given = {side: collections.Counter() for side in fractions}
    sizes = dict.fromkeys(fractions, 0)
    chosen: dict[str, list[int]] = {side: [] for side in fractions}
    for user in users:
        counts = collections.Counter(classes[i] for i in by_user[user])

        def need(side: str) -> tuple[float, float]:
            f = fractions[side]
            class_need = sum(
                n * (f * totals[c] - given[side][c]) / totals[c] for c, n in counts.items()
            )
            return class_need, f * len(records) - sizes[side]

        side = max(fractions, key=need)
        given[side].update(counts)
        sizes[side] += len(by_user[user])
        chosen[side].extend(by_user[user])

    if empty := [side for side, idx in chosen.items() if not idx]:
        logging.warning("Split sides %s got no users (%d users in all).", empty, len(users))
    return {side: [records[i] for i in sorted(idx)] for side, idx in chosen.items()}


def assert_user_disjoint(splits: Mapping[str, Sequence[_HasUser]]) -> None:
    """Raises UserOverlapError naming the first user found on two sides."""
    owner: dict[str, str] = {}
    for side, records in splits.items():
        for record in records:
            first = owner.setdefault(record.user_id, side)
            if first != side:
                raise UserOverlapError(
                    f"User {record.user_id!r} is in both {first!r} and {side!r}: a person seen "
                    "in training must not be evaluated on."
                )
