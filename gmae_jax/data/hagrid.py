"""HaGRID v1 and v2 annotations on disk -> annotated records, with a report naming every skip.

Readers parse JSON and list folders only, so a million-image tree reads in minutes. Class lists
and layouts live in `hagrid_layout`, labels and record filters in `record_filters`. Knows HaGRID
and nothing about JAX.
"""

import collections
from collections.abc import Iterator, Sequence
import dataclasses
import json
import math
from typing import Any

from absl import logging
from etils import epath

from gmae_jax.data.class_folders import DataLayoutError, is_regular_file
from gmae_jax.data.hagrid_layout import (HAGRID_V1_CLASSES, HAGRID_V2_CLASSES, NO_GESTURE, V1_ANNOTATION_SETS,
                                         V1_LAYOUT, V2_LAYOUT, V2_SPLITS, is_image)

# Boxes may overshoot [0, 1] by float noise; only larger overshoots are reported as clipped.
_CLIP_TOLERANCE = 1e-6

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

Box = tuple[float, float, float, float]


class AnnotationError(DataLayoutError):
    """An annotation file cannot be parsed; the message names the file."""


class MissingSplitsError(DataLayoutError):
    """Wanted v2 splits without their annotation folder; callers that know which flag asked for a
    split (sources) name it from `missing` and `present`."""

    def __init__(self, ann_root: epath.Path, missing: Sequence[str], present: Sequence[str]):
        self.ann_root, self.missing, self.present = ann_root, list(missing), list(present)
        super().__init__(
            f"Split folders {self.missing} are missing from {ann_root}; found {self.present}. Add the missing "
            f"annotation folders (the v2 layout is {V2_LAYOUT})."
        )


@dataclasses.dataclass(frozen=True)
class HagridRecord:
    """One annotated image. Boxes are normalised (x_topleft, y_topleft, w, h) within [0, 1]."""

    image_id: str
    path: str
    class_folder: str
    user_id: str
    boxes: tuple[Box, ...]
    labels: tuple[str, ...]
    united_box: Box | None = None
    united_label: str | None = None
    split: str = ""  # 'train' / 'val' / 'test' from the annotation file, '' when not given


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

    def describe_dropped(self, max_classes: int = 5) -> str:
        """'unknown_class 1251 (wave 180, ...), unannotated 3 (call 3)': images per reason and class."""
        parts = []
        for reason, per_class in self.dropped_images().items():
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

    def check_dropped(self, max_fraction: float, source: str, run_classes: Sequence[str] = ()) -> None:
        """Stops (DataLayoutError, one line) when more than `max_fraction` of the images would be lost.
        Read for a trained run (`run_classes`, evaluate), images of other gestures are not lost but not
        the run's to score: left out, counted in one line."""
        dropped = self.dropped_images()
        others = {r: dropped.pop(r) for r in (UNKNOWN_CLASS, UNKNOWN_LABEL) if run_classes and r in dropped}
        if others:
            logging.warning("%s: %d images of gestures the run was not trained on are left out (%s)", source,
                            sum(sum(c.values()) for c in others.values()),
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
            f"config.data.max_dropped_fraction={max_fraction}: {self.describe_dropped()}; {way_out}.")


def _load_json(path: epath.Path) -> dict[str, Any]:
    if not is_regular_file(path):  # a pipe would block the read forever
        raise AnnotationError(f"Annotation file {path} is no regular file (a folder, a pipe or a link to nothing); "
                              "put HaGRID's file back, or move it out of the annotation folder.")
    try:
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise AnnotationError(f"Annotation file {path} cannot be read ({e.strerror or e}).") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        # An error, not a skip: dropping the file would silently move its images out of the split.
        raise AnnotationError(f"Annotation file {path} is not valid JSON ({e}).") from e
    if not isinstance(data, dict):
        raise AnnotationError(
            f"Annotation file {path} holds a {type(data).__name__}; expected an object "
            "mapping image ids to annotations."
        )
    return data


def _annotation_files(
    folder: epath.Path, class_names: Sequence[str], image_folders: set[str], report: ReadReport
) -> Iterator[tuple[str, epath.Path, dict[str, Any]]]:
    """(class, file, parsed JSON) for each `<class>.json` of a split folder."""
    for path in sorted(folder.iterdir()):
        if path.suffix != ".json" or path.name.startswith("."):
            report.skip(STRAY_FILE, str(path))
        elif path.stem not in class_names:
            report.skip(UNKNOWN_CLASS, str(path))  # its images are counted with their folder
        elif path.stem not in image_folders:
            report.skip(NO_IMAGE_FOLDER, str(path))
        else:
            yield path.stem, path, _load_json(path)


def _scan_images(
    images_root: epath.Path, class_names: Sequence[str], report: ReadReport, exclude: frozenset[str]
) -> dict[tuple[str, str], epath.Path]:
    """Image files by (class folder, file stem); everything else is skipped and reported."""
    found = {}
    for folder in sorted(images_root.iterdir()):
        if folder.name in exclude:
            continue
        if not folder.is_dir():
            report.skip(STRAY_FILE, str(folder))
            continue
        if folder.name not in class_names:
            report.drop(UNKNOWN_CLASS, str(folder), folder.name, sum(map(is_image, folder.iterdir())))
            continue
        num_images = 0
        for entry in sorted(folder.iterdir()):
            if not is_image(entry):
                report.skip(STRAY_FILE, str(entry))
            else:
                found[(folder.name, entry.stem)] = entry
                num_images += 1
        if not num_images:
            report.skip(EMPTY_CLASS_FOLDER, str(folder))
    return found


def _parse_box(value: Any) -> Box:
    x, y, w, h = (float(v) for v in value)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ValueError(f"non-finite box {value}")
    return x, y, w, h


def clip_box(box: Box) -> Box | None:
    """The part of a relative (x, y, w, h) box inside the image [0, 1]^2; None when nothing is left."""
    x, y, w, h = box
    x0, y0 = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    x1, y1 = min(max(x + w, 0.0), 1.0), min(max(y + h, 0.0), 1.0)
    return (x0, y0, x1 - x0, y1 - y0) if x1 > x0 and y1 > y0 else None


def _clip(box: Box, name: str, report: ReadReport) -> Box | None:
    """`clip_box`, reporting a box dropped, or clipped by more than rounding."""
    clipped = clip_box(box)
    x, y, w, h = box
    if clipped is None:
        report.repair(DROPPED_BOX, name)
    elif min(x, y) < -_CLIP_TOLERANCE or max(x + w, y + h) > 1 + _CLIP_TOLERANCE:
        report.repair(CLIPPED_BOX, name)
    return clipped


def _first(value: Any) -> Any:
    """`united_bbox` / `united_label` come as [[box]] / [label] in v2 but may be bare or null."""
    if isinstance(value, list) and value and not isinstance(value[0], (int, float)):
        return value[0]
    return value or None


def _make_record(
    entry: Any, image_id: str, path: epath.Path, class_folder: str, split: str,
    class_names: Sequence[str], report: ReadReport,
) -> HagridRecord | None:  # fmt: skip
    name = str(path)
    drop = lambda reason, detail="": report.drop(reason, name, class_folder, detail=detail)  # noqa: E731
    try:
        raw_boxes = [_parse_box(b) for b in entry["bboxes"]]
        labels = tuple(entry["labels"])
        user_id = entry["user_id"]
        united_label = _first(entry.get("united_label"))
        united_box = _first(entry.get("united_bbox"))
        united_box = None if united_box is None else _parse_box(united_box)
        if len(raw_boxes) != len(labels) or not all(isinstance(v, str) for v in (*labels, user_id)):
            raise ValueError("labels must be strings, one per box, and user_id a string")
        if united_label is not None and not isinstance(united_label, str):
            raise ValueError(f"united_label must be a string, got {united_label!r}")
    except (KeyError, TypeError, ValueError) as e:
        drop(MALFORMED_ENTRY, repr(e))
        return None
    # no_gesture marks a free hand in every HaGRID tree, whatever the gesture classes are.
    unknown = sorted({l for l in (*labels, united_label) if l is not None} - {*class_names, NO_GESTURE})
    if unknown:
        drop(UNKNOWN_LABEL, str(unknown))
        return None
    clipped = [_clip(b, name, report) for b in raw_boxes]
    kept = [(b, l) for b, l in zip(clipped, labels) if b is not None]
    if not kept:
        drop(EMPTY_BBOXES)
        return None
    boxes, labels = (tuple(column) for column in zip(*kept))
    if united_box is not None:
        united_box = _clip(united_box, name, report)
    return HagridRecord(
        image_id, name, class_folder, user_id, boxes, labels, united_box, united_label, split
    )


def _read(
    annotation_dirs: dict[epath.Path, str | None], images_root: epath.Path,
    class_names: Sequence[str], exclude: frozenset[str] = frozenset(), disjoint: frozenset[str] = frozenset(),
) -> tuple[list[HagridRecord], ReadReport]:  # fmt: skip
    """Joins annotation folders (-> split, or None: ids only count as annotated) with images. An id
    in two of the `disjoint` folders (splits) is kept in the first only (IN_TWO_SPLITS)."""
    report = ReadReport()
    images = _scan_images(images_root, class_names, report, exclude)
    image_folders = {folder.name for folder in images_root.iterdir()
                     if folder.name in class_names and folder.name not in exclude and folder.is_dir()}
    annotated: dict[tuple[str, str], epath.Path] = {}  # -> the annotation file that claimed it first
    records = []
    for folder, split in annotation_dirs.items():
        for class_folder, path, data in _annotation_files(folder, class_names, image_folders, report):
            for image_id, entry in data.items():
                key = (class_folder, image_id)
                first = annotated.setdefault(key, path)
                if first.parent != folder and {first.parent.name, folder.name} <= disjoint:
                    report.drop(IN_TWO_SPLITS, str(images.get(key, path)), class_folder,
                                detail=f"{image_id} annotated again in {path} (kept in {first})")
                    continue
                if split is None:
                    continue
                if key not in images:
                    report.drop(MISSING_IMAGE, str(images_root / class_folder / f"{image_id}.jpg"), class_folder)
                    continue
                args = (image_id, images[key], class_folder, split, class_names, report)
                if record := _make_record(entry, *args):
                    records.append(record)
    for key in sorted(images.keys() - annotated):
        report.drop(UNANNOTATED, str(images[key]), key[0])
    report.num_records = len(records)
    return records, report


def read_hagrid_v2(
    root: epath.PathLike,
    splits: Sequence[str] | None = None,
    class_names: Sequence[str] = HAGRID_V2_CLASSES,
) -> tuple[list[HagridRecord], ReadReport]:
    """Records of the given splits (default: every split folder present) of a HaGRID v2 tree.

    Layout: `<root>/hagrid_dataset/<class>/<id>.jpg` with the split given by which
    `<root>/hagrid_annotations/<split>/<class>.json` lists the id. Ids of splits not asked
    for still count as annotated, so their images are not reported as unannotated.
    """
    root = epath.Path(root)
    ann_root, images_root = root / "hagrid_annotations", root / "hagrid_dataset"
    for folder in (ann_root, images_root):
        if not folder.is_dir():
            raise DataLayoutError(f"{folder} is missing; expected the v2 layout {V2_LAYOUT}.")
    present = [s for s in V2_SPLITS if (ann_root / s).is_dir()]
    wanted = present if splits is None else list(splits)
    missing = [s for s in wanted if s not in present] if wanted else list(V2_SPLITS)
    if missing:
        raise MissingSplitsError(ann_root, missing, present)
    dirs = {ann_root / s: (s if s in wanted else None) for s in present}
    records, report = _read(dirs, images_root, class_names, disjoint=frozenset(V2_SPLITS))
    report.log(str(root))
    return records, report


def read_hagrid_v1(
    root: epath.PathLike,
    annotation_set: str = "ann_train_val",
    images_dir: epath.PathLike | None = None,
    class_names: Sequence[str] = HAGRID_V1_CLASSES,
) -> tuple[list[HagridRecord], ReadReport]:
    """Records of one HaGRID v1 annotation set.

    Layout: `<root>/<annotation_set>/<class>.json` and images `<images_dir>/<class>/<id>.jpg`,
    `images_dir` defaulting to root (relative paths are under root) -- how the official
    per-class archives and the annotation archive unpack side by side. Folders named like
    annotation sets are not image folders; ids of the other sets present under root count
    as annotated. Split is 'test' for ann_test, '' otherwise (train_val is re-split by user).
    """
    if annotation_set not in V1_ANNOTATION_SETS:
        raise ValueError(f"annotation_set {annotation_set!r} is not in {list(V1_ANNOTATION_SETS)}.")
    root = epath.Path(root)
    images_root = root if images_dir is None else root / images_dir
    for folder in (root / annotation_set, images_root):
        if not folder.is_dir():
            raise DataLayoutError(f"{folder} is missing; expected the v1 layout {V1_LAYOUT}.")
    dirs = {
        root / name: (split if name == annotation_set else None)
        for name, split in V1_ANNOTATION_SETS.items()
        if (root / name).is_dir()
    }
    # ann_subsample repeats ids of the other two sets by design; train_val and test must not share any.
    records, report = _read(dirs, images_root, class_names, frozenset(V1_ANNOTATION_SETS),
                            disjoint=frozenset({"ann_train_val", "ann_test"}))
    report.log(str(root / annotation_set))
    return records, report
