"""Which HaGRID records a run can use: each record's gesture label, and dropping the records that
have none in the class list. Knows HaGRID and nothing about JAX. (Images that do not decode are
found by the prepare stage's full decode and counted and skipped by the training pipeline's
bad-image budget, not here.)
"""

from collections.abc import Sequence

from gmae_jax.data.hagrid import HagridRecord
from gmae_jax.data.hagrid_layout import NO_GESTURE
from gmae_jax.data.read_report import NO_GESTURE_LABEL, ReadReport


def gesture_name(record: HagridRecord) -> str | None:
    """Full-frame label: the first label that is not no_gesture.

    An image with only no_gesture hands is no_gesture only in the no_gesture folder: in a
    gesture folder it means the gesture went unannotated, so it gets no label (None).
    """
    for label in record.labels:
        if label != NO_GESTURE:
            return label
    return NO_GESTURE if record.class_folder == NO_GESTURE else None


def gesture_label(record: HagridRecord, class_names: Sequence[str]) -> int | None:
    """Index of `gesture_name` in class_names; None (skip and count) when it has none there."""
    name = gesture_name(record)
    return class_names.index(name) if name in class_names else None


def drop_unlabelled(
    records: Sequence[HagridRecord], class_names: Sequence[str], report: ReadReport
) -> list[HagridRecord]:
    """Records with a gesture label in class_names; the others (only no_gesture hands outside the
    no_gesture folder: an unannotated gesture) are dropped into the report, never guessed."""
    kept = []
    for record in records:
        if gesture_label(record, class_names) is None:
            report.drop(NO_GESTURE_LABEL, record.path, record.class_folder)
        else:
            kept.append(record)
    report.num_records -= len(records) - len(kept)
    return kept
