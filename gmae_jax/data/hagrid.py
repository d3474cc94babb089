"""HaGRID v1 and v2 trees on disk -> annotated records, with a report naming every skip.

Readers parse JSON and list folders only, so a million-image tree reads in minutes;
`verify_images` decodes, for the prepare stage. Knows HaGRID and nothing about JAX.
"""

import collections
from collections.abc import Iterator, Sequence
import concurrent.futures
import dataclasses
import json
import math
from typing import Any

from absl import logging
from etils import epath

from gmae_jax.data.class_folders import IMAGE_SUFFIXES, DataLayoutError
from gmae_jax.data.transforms import ImageDecodeError, decode_rgb

NO_GESTURE = "no_gesture"
_V1_GESTURES = (
    "call", "dislike", "fist", "four", "like", "mute", "ok", "one", "palm", "peace",
    "peace_inverted", "rock", "stop", "stop_inverted", "three", "three2", "two_up",
    "two_up_inverted",
)  # fmt: skip
_V2_ADDED = (
    "grabbing", "grip", "holy", "point", "three3", "timeout", "xsign", "hand_heart",
    "hand_heart2", "little_finger", "middle_finger", "take_picture", "three_gun",
    "thumb_index", "thumb_index2",
)  # fmt: skip
# Label indices are positions in these tuples: never reorder, only append in a new constant.
HAGRID_V1_CLASSES = _V1_GESTURES + (NO_GESTURE,)
HAGRID_V2_CLASSES = _V1_GESTURES + _V2_ADDED + (NO_GESTURE,)
TWO_HANDED = frozenset(
    {"hand_heart", "hand_heart2", "thumb_index2", "timeout", "holy", "take_picture", "xsign"}
)

V2_SPLITS = ("train", "val", "test")
# v1 annotation set -> the split it defines ('' where train and val are mixed).
V1_ANNOTATION_SETS = {"ann_train_val": "", "ann_test": "test", "ann_subsample": ""}
_V2_LAYOUT = "hagrid_dataset/<class>/<id>.jpg + hagrid_annotations/{train,val,test}/<class>.json"
_V1_LAYOUT = "{ann_train_val,ann_test,ann_subsample}/<class>.json + <images_dir>/<class>/<id>.jpg"
_CLASS_FOLDERS_LAYOUT = "<root>/{train,val}/<class>/*.jpg"
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
EMPTY_CLASS_FOLDER = "empty_class_folder"
EMPTY_BBOXES = "empty_bboxes"  # no boxes, or none left after dropping zero-area ones
UNKNOWN_LABEL = "unknown_label"  # a box label outside the class list
MALFORMED_ENTRY = "malformed_entry"  # missing keys, wrong types, boxes/labels length mismatch
CLIPPED_BOX = "clipped_box"  # repair: box clipped to the image
DROPPED_BOX = "dropped_box"  # repair: zero-area box (after clipping) dropped with its label
NO_GESTURE_LABEL = "no_gesture_label"  # only no_gesture hands outside the no_gesture folder
# config.data.classes: the official list of the layout's HaGRID version, or the class folders found.
OFFICIAL, PRESENT = "hagrid", "present"

Box = tuple[float, float, float, float]


class AnnotationError(DataLayoutError):
    """An annotation file cannot be parsed; the message names the file."""


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
    """What a reader kept, skipped and repaired: reason -> names of the files concerned.

    `dropped` counts images (not files or folders): reason -> name -> (class, images), so that a
    skipped folder of 180 images weighs 180 and reading the same tree twice counts it once.
    """

    num_records: int = 0
    skipped: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    repaired: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    dropped: dict[str, dict[str, tuple[str, int]]] = dataclasses.field(default_factory=dict)

    def skip(self, reason: str, name: str) -> None:
        self.skipped.setdefault(reason, []).append(name)

    def drop(self, reason: str, name: str, class_name: str, images: int = 1) -> None:
        """Skips `name`, which loses `images` images of `class_name`."""
        self.skip(reason, name)
        self.dropped.setdefault(reason, {})[name] = (class_name, images)

    def repair(self, reason: str, name: str) -> None:
        self.repaired.setdefault(reason, []).append(name)

    def merge(self, other: "ReadReport") -> None:
        """Adds another read of the same tree (v1 train_val and test); shared skips count once."""
        self.num_records += other.num_records
        for mine, theirs in ((self.skipped, other.skipped), (self.repaired, other.repaired)):
            for reason, names in theirs.items():
                seen = set(mine.get(reason, ()))
                mine.setdefault(reason, []).extend(n for n in names if n not in seen)
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
        logging.info("Read %d records from %s; %s", self.num_records, source, self.counts())
        for reason, names in (self.skipped | self.repaired).items():
            logging.warning("%s: %d x %s, e.g. %s", source, len(names), reason, names[:3])
        if self.dropped_images():
            logging.warning("%s: images dropped per reason (class counts): %s", source, self.describe_dropped())

    def check_dropped(self, max_fraction: float, source: str) -> None:
        """Stops (DataLayoutError, one line) when more than `max_fraction` of the images would be lost."""
        lost = sum(sum(c.values()) for c in self.dropped_images().values())
        total = lost + self.num_records
        if not total or lost <= max_fraction * total:
            return
        if UNKNOWN_CLASS in self.dropped_images():
            way_out = ("set --config.data.classes=present to use the classes found in the tree "
                       "(or list them: --config.data.classes=name1,name2,...)")
        else:
            way_out = "fix the data"
        raise DataLayoutError(
            f"{lost} of {total} images ({100 * lost / total:.1f}%) of {source} would be dropped, more than "
            f"config.data.max_dropped_fraction={max_fraction}: {self.describe_dropped()}; {way_out}, or "
            "raise --config.data.max_dropped_fraction to accept the loss.")


def _image_folders(images_root: epath.Path, exclude: frozenset[str]) -> list[epath.Path]:
    return [f for f in sorted(images_root.iterdir())
            if f.is_dir() and f.name not in exclude and not f.name.startswith(".")]


def _is_image(entry: epath.Path) -> bool:
    return not entry.name.startswith(".") and entry.suffix.lower() in IMAGE_SUFFIXES


def images_root_of(root: epath.PathLike, layout: str) -> tuple[epath.Path, frozenset[str]]:
    """Where a layout keeps its class folders, and the folders there that are not classes."""
    root = epath.Path(root)
    if layout == "hagrid_v2":
        return root / "hagrid_dataset", frozenset()
    return root, frozenset(V1_ANNOTATION_SETS)


def resolve_classes(classes: str | Sequence[str], layout: str, root: epath.PathLike) -> list[str]:
    """The class list that `config.data.classes` means for a HaGRID tree (labels index it).

    'hagrid': the official list of the layout's version (a label means the same in every run);
    'present': the class folders that hold images, sorted, no_gesture last as in HaGRID's lists;
    else the given names (a comma-separated string or a sequence), in their order.
    """
    if isinstance(classes, str) and classes == OFFICIAL:
        return list(HAGRID_V2_CLASSES if layout == "hagrid_v2" else HAGRID_V1_CLASSES)
    if isinstance(classes, str) and classes == PRESENT:
        images_root, exclude = images_root_of(root, layout)
        names = sorted(f.name for f in _image_folders(images_root, exclude) if any(map(_is_image, f.iterdir())))
        if not names:
            raise DataLayoutError(f"{images_root} holds no class folder with images; config.data.classes=present "
                                  "found no classes.")
        return sorted(names, key=lambda name: name == NO_GESTURE)
    return parse_class_list(classes)


def parse_class_list(classes: str | Sequence[str]) -> list[str]:
    """An explicit `config.data.classes` as a list of unique names; a one-line error otherwise."""
    names = [n.strip() for n in classes.split(",")] if isinstance(classes, str) else [str(n) for n in classes]
    if not all(names) or len(set(names)) != len(names):
        raise DataLayoutError(
            f"config.data.classes={classes!r} must be 'hagrid', 'present' or a list of distinct class names "
            "(e.g. --config.data.classes=call,like,palm).")
    return names


def detect_layout(root: epath.PathLike) -> str:
    """'hagrid_v2', 'hagrid_v1' or 'class_folders', from the folders directly under root."""
    root = epath.Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"Dataset root {root} does not exist or is not a folder.")
    v2_parts = [(root / name).is_dir() for name in ("hagrid_dataset", "hagrid_annotations")]
    if all(v2_parts):
        return "hagrid_v2"
    if any(v2_parts):
        raise DataLayoutError(f"{root} holds only part of the HaGRID v2 layout {_V2_LAYOUT}.")
    if any((root / name).is_dir() for name in V1_ANNOTATION_SETS):
        return "hagrid_v1"
    if (root / "train").is_dir():
        return "class_folders"
    raise DataLayoutError(
        f"Cannot tell the layout of {root}; expected one of: HaGRID v2 {_V2_LAYOUT}; "
        f"HaGRID v1 {_V1_LAYOUT}; class folders {_CLASS_FOLDERS_LAYOUT}."
    )


def _load_json(path: epath.Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
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
            report.drop(UNKNOWN_CLASS, str(folder), folder.name, sum(map(_is_image, folder.iterdir())))
            continue
        num_images = 0
        for entry in sorted(folder.iterdir()):
            if not _is_image(entry):
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


def _clip(box: Box, name: str, report: ReadReport) -> Box | None:
    """The box clipped to [0, 1]; None (reported) when nothing of it is left."""
    x, y, w, h = box
    x0, y0 = min(max(x, 0.0), 1.0), min(max(y, 0.0), 1.0)
    x1, y1 = min(max(x + w, 0.0), 1.0), min(max(y + h, 0.0), 1.0)
    if x1 <= x0 or y1 <= y0:
        report.repair(DROPPED_BOX, name)
        return None
    if min(x, y) < -_CLIP_TOLERANCE or max(x + w, y + h) > 1 + _CLIP_TOLERANCE:
        report.repair(CLIPPED_BOX, name)
    return x0, y0, x1 - x0, y1 - y0


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
    drop = lambda reason, what: report.drop(reason, what, class_folder)  # noqa: E731
    try:
        raw_boxes = [_parse_box(b) for b in entry["bboxes"]]
        labels = tuple(entry["labels"])
        user_id = entry["user_id"]
        united_label = _first(entry.get("united_label"))
        united_box = _first(entry.get("united_bbox"))
        united_box = None if united_box is None else _parse_box(united_box)
        if len(raw_boxes) != len(labels) or not all(isinstance(v, str) for v in (*labels, user_id)):
            raise ValueError("labels must be strings, one per box, and user_id a string")
    except (KeyError, TypeError, ValueError) as e:
        drop(MALFORMED_ENTRY, f"{name}: {e!r}")
        return None
    # no_gesture marks a free hand in every HaGRID tree, whatever the gesture classes are.
    unknown = sorted({l for l in (*labels, united_label) if l is not None} - {*class_names, NO_GESTURE})
    if unknown:
        drop(UNKNOWN_LABEL, f"{name}: {unknown}")
        return None
    clipped = [_clip(b, name, report) for b in raw_boxes]
    kept = [(b, l) for b, l in zip(clipped, labels) if b is not None]
    if not kept:
        drop(EMPTY_BBOXES, name)
        return None
    boxes, labels = (tuple(column) for column in zip(*kept))
    if united_box is not None:
        united_box = _clip(united_box, name, report)
    return HagridRecord(
        image_id, name, class_folder, user_id, boxes, labels, united_box, united_label, split
    )


def _read(
    annotation_dirs: dict[epath.Path, str | None], images_root: epath.Path,
    class_names: Sequence[str], exclude: frozenset[str] = frozenset(),
) -> tuple[list[HagridRecord], ReadReport]:  # fmt: skip
    """Joins annotation folders (-> split, or None: ids only count as annotated) with images."""
    report = ReadReport()
    images = _scan_images(images_root, class_names, report, exclude)
    image_folders = {class_folder for class_folder, _ in images}
    annotated, records = set(), []
    for folder, split in annotation_dirs.items():
        for class_folder, _, data in _annotation_files(folder, class_names, image_folders, report):
            for image_id, entry in data.items():
                key = (class_folder, image_id)
                annotated.add(key)
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
            raise DataLayoutError(f"{folder} is missing; expected the v2 layout {_V2_LAYOUT}.")
    present = [s for s in V2_SPLITS if (ann_root / s).is_dir()]
    wanted = present if splits is None else list(splits)
    missing = [s for s in wanted if s not in present] if wanted else list(V2_SPLITS)
    if missing:
        raise DataLayoutError(
            f"Split folders {missing} are missing from {ann_root}; found {present}. "
            "Pass splits= to read only those present."
        )
    dirs = {ann_root / s: (s if s in wanted else None) for s in present}
    records, report = _read(dirs, images_root, class_names)
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
            raise DataLayoutError(f"{folder} is missing; expected the v1 layout {_V1_LAYOUT}.")
    dirs = {
        root / name: (split if name == annotation_set else None)
        for name, split in V1_ANNOTATION_SETS.items()
        if (root / name).is_dir()
    }
    records, report = _read(dirs, images_root, class_names, frozenset(V1_ANNOTATION_SETS))
    report.log(str(root / annotation_set))
    return records, report


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
