"""What a reader of a data tree kept, skipped and repaired, and why: the reasons, the images each
drop loses per class, the log lines, and the budget check that stops a run losing too many."""

import collections
from collections.abc import Iterable, Sequence
import dataclasses

from absl import logging

from gmae_jax.data.class_folders import DataLayoutError

# Report reasons. Skips drop a file or annotation; repairs keep the record.
MISSING_IMAGE = "missing_image"  # listed in a JSON, no file on disk
UNANNOTATED = "unannotated"  # on disk, in no annotation file
UNKNOWN_CLASS = "unknown_class"  # image folder or JSON file whose class is not in the class list
# A JSON file whose class has no image folder: that gesture was not downloaded (HaGRID ships the
# annotations of every gesture in one archive, the images per gesture), so no image is lost.
NO_IMAGE_FOLDER = "no_image_folder"
STRAY_FILE = "stray_file"  # .DS_Store, non-images in image folders, non-JSON in annotation folders
# A class folder without images (an extraction that failed?): its annotated images count as missing.
EMPTY_CLASS_FOLDER = "empty_class_folder"
# An image annotated in two splits: kept in the first (train, val, test order), dropped from the
# other, so no image is trained on and evaluated on.
IN_TWO_SPLITS = "in_two_splits"
EMPTY_BBOXES = "empty_bboxes"  # no boxes, or none left after dropping zero-area ones
UNKNOWN_LABEL = "unknown_label"  # a box label outside the class list
MALFORMED_ENTRY = "malformed_entry"  # missing keys, wrong types, boxes/labels length mismatch
CLIPPED_BOX = "clipped_box"  # repair: box clipped to the image
DROPPED_BOX = "dropped_box"  # repair: zero-area box (after clipping) dropped with its label
NO_GESTURE_LABEL = "no_gesture_label"  # only no_gesture hands outside the no_gesture folder


@dataclasses.dataclass
class ReadReport:
    """What a reader kept, skipped and repaired: reason -> names of the files concerned, and for some
    names what was wrong with them (`details`), kept apart so that a name is always a whole path.

    `dropped` counts images (not files or folders): reason -> name -> (class, images), so that a
    skipped folder of 180 images weighs 180 and reading the same tree twice counts it once.
    """

    num_records: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    repaired: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    dropped: dict[str, dict[str, tuple[str, int]]] = dataclasses.field(default_factory=dict)
    details: dict[tuple[str, str], str] = dataclasses.field(default_factory=dict)  # (reason, name) -> detail

    def skip(self, reason: str, name: str, detail: str = "") -> None:
        self.skipped.setdefault(reason, []).append(name)
        if detail:
            self.details[(reason, name)] = detail

    def drop(self, reason: str, name: str, class_name: str, images: int = 1, detail: str = "") -> None:
        """Skips `name`, which loses `images` images of `class_name`."""
        self.skip(reason, name, detail)
        self.dropped.setdefault(reason, {})[name] = (class_name, images)

    def described(self, reason: str, names: Sequence[str]) -> list[str]:
        """'name: what was wrong' where that is known, else the name."""
        return [f"{name}: {self.details[(reason, name)]}" if (reason, name) in self.details else name
                for name in names]

    def repair(self, reason: str, name: str) -> None:
        self.repaired.setdefault(reason, []).append(name)

    def merge(self, other: "ReadReport") -> None:
        """Adds another read of the same tree (v1 train_val and test); shared skips count once."""
        self.num_records += other.num_records
        for mine, theirs in ((self.skipped, other.skipped), (self.repaired, other.repaired)):
            for reason, names in theirs.items():
                seen = set(mine.get(reason, ()))
                mine.setdefault(reason, []).extend(n for n in names if n not in seen)
        self.details.update(other.details)
        for reason, names in other.dropped.items():
            self.dropped.setdefault(reason, {}).update(names)

    def counts(self) -> dict[str, int]:
        return {r: len(n) for r, n in (self.skipped | self.repaired).items()}

    def dropped_images(self) -> dict[str, collections.Counter]:
        """reason -> class -> images lost, largest first."""
        result = {}
        for reason, names in self.dropped.items():
            per_class = collections.Counter()
            for class_name, images in names.values():
                per_class[class_name] += images
            if sum(per_class.values()):
                result[reason] = per_class
        return dict(sorted(result.items(), key=lambda item: -sum(item[1].values())))

    def examples(self, reasons: Iterable[str], per_reason: int = 2) -> str:
        """The first files dropped for each of `reasons`, with what was wrong where known: a count alone
        does not say which file to fix."""
        return "; ".join(f"{reason}: {', '.join(self.described(reason, sorted(self.dropped[reason])[:per_reason]))}"
                         for reason in reasons)

    def describe_dropped(self, leave_out: Iterable[str] = (), max_classes: int = 5) -> str:
        """'unknown_class 1251 (wave 180, ...), unannotated 3 (call 3)': images per reason and class
        (but `leave_out`'s)."""
        parts = []
        for reason, per_class in self.dropped_images().items():
            if reason in leave_out:
                continue
            shown = ", ".join(f"{name} {n}" for name, n in per_class.most_common(max_classes))
            more = f", +{len(per_class) - max_classes} more classes" if len(per_class) > max_classes else ""
            parts.append(f"{reason} {sum(per_class.values())} ({shown}{more})")
        return ", ".join(parts) or "none"

    def log(self, source: str) -> None:
        """One info line with the totals, one warning per reason with the first few names."""
        logging.info("Read %d records from %s; skipped or repaired entries: %s", self.num_records, source,
                     ", ".join(f"{reason} {n}" for reason, n in self.counts().items()) or "none")
        for reason, names in (self.skipped | self.repaired).items():
            logging.warning("%s: %d x %s, e.g. %s", source, len(names), reason, self.described(reason, names[:3]))
        if self.dropped_images():
            logging.warning("%s: images dropped per reason (class counts): %s", source, self.describe_dropped())

    def check_dropped(self, max_fraction: float, source: str, run_classes: Sequence[str] = (),
                      chosen_classes: bool = False) -> None:
        """Stops (DataLayoutError, one line) when more than `max_fraction` of the images would be lost.
        Read for a trained run (`run_classes`, evaluate), images of other gestures are not lost but not
        the run's to score: left out, counted in one line. So are those of gestures left out of a class
        list the user wrote (`chosen_classes`): a choice, not a loss."""
        dropped = self.dropped_images()
        others = {r: dropped.pop(r) for r in (UNKNOWN_CLASS, UNKNOWN_LABEL)
                  if (run_classes or chosen_classes) and r in dropped}
        if others:
            whose = "the run was not trained on" if run_classes else "outside config.data.classes"
            logging.warning("%s: %d images of gestures %s are left out (%s)", source,
                            sum(sum(c.values()) for c in others.values()), whose,
                            "; ".join(f"{r}: {dict(c)}" for r, c in others.items()))
        lost = sum(sum(c.values()) for c in dropped.values())
        total = lost + self.num_records
        if not total or lost <= max_fraction * total:
            return
        if UNKNOWN_CLASS in dropped:  # not where run_classes left them out above
            way_out = ("set --config.data.classes=present to use the classes found in the tree (or list them: "
                       "--config.data.classes=name1,name2,...), or raise --config.data.max_dropped_fraction to "
                       "accept the loss")
        else:
            way_out = ("fix the data, or give other data (--config.data_root)" if run_classes else
                       "fix the data, or raise --config.data.max_dropped_fraction to accept the loss")
        raise DataLayoutError(
            f"{lost} of {total} images ({100 * lost / total:.1f}%) of {source} would be dropped, more than "
            f"config.data.max_dropped_fraction={max_fraction}: {self.describe_dropped(set(others))} "
            f"(e.g. {self.examples(list(dropped)[:3])}); {way_out}.")
