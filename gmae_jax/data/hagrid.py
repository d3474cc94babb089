"""HaGRID v1 and v2 annotations on disk -> annotated records, with a report naming every skip
(`read_report`).

Readers parse JSON and list folders only, so a million-image tree reads in minutes. Class lists
and layouts live in `hagrid_layout`, labels and record filters in `record_filters`. Knows HaGRID
and nothing about JAX.
"""

from collections.abc import Iterator, Sequence
import dataclasses
import json
import math
from typing import Any

from etils import epath

from gmae_jax.data.class_folders import DataLayoutError, is_regular_file
from gmae_jax.data.hagrid_layout import (HAGRID_V1_CLASSES, HAGRID_V2_CLASSES, NO_GESTURE, V1_ANNOTATION_SETS,
                                         V1_LAYOUT, V2_LAYOUT, V2_SPLITS, is_image)
from gmae_jax.data.read_report import (CLIPPED_BOX, DROPPED_BOX, EMPTY_BBOXES, EMPTY_CLASS_FOLDER, IN_TWO_SPLITS,
                                       MALFORMED_ENTRY, MISSING_IMAGE, NO_IMAGE_FOLDER, STRAY_FILE, UNANNOTATED,
                                       UNKNOWN_CLASS, UNKNOWN_LABEL, ReadReport)

# Boxes may overshoot [0, 1] by float noise; only larger overshoots are reported as clipped.
_CLIP_TOLERANCE = 1e-6

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

    @classmethod
    def from_json_dict(cls, fields: dict[str, Any]) -> "HagridRecord":
        """A record from its `dataclasses.asdict` read back from JSON (lists where it holds tuples), as
        prepared shards and the TFDS builder store it."""
        def box(value: Any) -> Box | None:
            return None if value is None else tuple(float(v) for v in value)

        return cls(**{**fields, "boxes": tuple(box(b) for b in fields["boxes"]), "labels": tuple(fields["labels"]),
                      "united_box": box(fields["united_box"])})


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
    _count_unknown_classes_of_splits_read(annotation_dirs, report)
    lacking: dict[str, str] = {}  # class -> the annotation files it lacks: a count alone would not say why
    for key in sorted(images.keys() - annotated):
        if key[0] not in lacking:
            absent = [str(folder / f"{key[0]}.json") for folder in annotation_dirs
                      if not (folder / f"{key[0]}.json").is_file()]
            verb = "does" if len(absent) == 1 else "do"
            lacking[key[0]] = f"{' and '.join(absent)} {verb} not exist" if absent else ""
        report.drop(UNANNOTATED, str(images[key]), key[0], detail=lacking[key[0]])
    report.num_records = len(records)
    return records, report


def _count_unknown_classes_of_splits_read(annotation_dirs: dict[epath.Path, str | None], report: ReadReport) -> None:
    """An image folder of a gesture outside the class list counts all its images as dropped, where the
    kept images are those of the splits read: those its annotation files give to splits not read are
    taken off, so that the dropped fraction compares like with like."""
    for folder, (class_folder, images) in report.dropped.get(UNKNOWN_CLASS, {}).items():
        others = [d / f"{class_folder}.json" for d, split in annotation_dirs.items()
                  if split is None and (d / f"{class_folder}.json").is_file()]
        try:
            ids = {image_id for path in others for image_id in _load_json(path)}
        except AnnotationError:  # a file of a class not read is not ours to judge: the count stays whole
            continue
        if ids:
            elsewhere = sum(is_image(f) and f.stem in ids for f in epath.Path(folder).iterdir())
            report.dropped[UNKNOWN_CLASS][folder] = (class_folder, images - elsewhere)


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
