"""Which HaGRID records a run can use: each record's gesture label, and dropping the records that
have none in the class list or whose image does not decode. Knows HaGRID and nothing about JAX.
"""

from collections.abc import Sequence
import concurrent.futures

from absl import logging

from gmae_jax.data.hagrid import NO_GESTURE_LABEL, HagridRecord, ReadReport
from gmae_jax.data.hagrid_layout import NO_GESTURE
from gmae_jax.data.transforms import ImageDecodeError, decode_rgb


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


def _decode_problem(record: HagridRecord) -> str | None:
    try:
        decode_rgb(record.path)
    except ImageDecodeError as e:
        return str(e)
    return None


def verify_images(
    records: Sequence[HagridRecord], num_threads: int = 8
) -> tuple[list[HagridRecord], list[tuple[HagridRecord, str]]]:
    """Decodes every image fully (PIL releases the GIL); returns the good and (bad, reason).

    A full decode is what catches truncated files; the prepare stage runs it once.
    """
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
        problems = list(pool.map(_decode_problem, records))
    good = [r for r, p in zip(records, problems) if p is None]
    bad = [(r, p) for r, p in zip(records, problems) if p is not None]
    if bad:
        logging.warning("%d of %d images do not decode, e.g. %s", len(bad), len(records), bad[0][1])
    return good, bad
