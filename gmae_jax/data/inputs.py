"""What the predict stage reads: one image, a folder of images (searched recursively), or a HaGRID
v1 / v2 tree (one hand crop per annotated image). Every file under the input becomes either an
`Input` or a (file, reason) skip, so a listing accounts for each file exactly once."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

from absl import logging
from etils import epath

from gmae_jax.data import crops, hagrid, hagrid_layout, read_report, record_filters, sources
from gmae_jax.data.class_folders import IMAGE_SUFFIXES, DataLayoutError, is_regular_file


@dataclasses.dataclass(frozen=True)
class Input:
    path: str
    box: hagrid.Box | None = None  # HaGRID trees: the gesture box to crop around
    annotation: str = ""  # HaGRID trees: the annotated gesture, for comparison


def _is_hagrid(root: epath.Path) -> bool:
    try:
        return hagrid_layout.detect_layout(root) in ("hagrid_v1", "hagrid_v2")
    except DataLayoutError:
        return False


def _hagrid_inputs(root: epath.Path, classes: Sequence[str]) -> tuple[list[Input], list[tuple[str, str]]]:
    """One input per annotated image of HaGRID's gestures or `classes`; every other file of the tree's
    image folders is skipped with the reason the annotation reader gave it (no usable box, unknown
    class folder, ...)."""
    if hagrid_layout.detect_layout(root) == "hagrid_v2":
        found = [hagrid.read_hagrid_v2(root, class_names=_with(hagrid_layout.HAGRID_V2_CLASSES, classes))]
        images_root, not_images = root / "hagrid_dataset", set()
    else:
        sets = [name for name in hagrid_layout.V1_ANNOTATION_SETS if (root / name).is_dir()]
        known = _with(hagrid_layout.HAGRID_V1_CLASSES, classes)
        found = [hagrid.read_hagrid_v1(root, name, class_names=known) for name in sets]
        images_root, not_images = root, set(sets)
    items, seen, reasons, strays = [], set(), {}, []
    for records, report in found:
        for record in records:
            if record.path not in seen:  # v1 sets may share images
                seen.add(record.path)
                label = record_filters.gesture_name(record) or ""
                items.append(Input(record.path, crops.gesture_box(record), label))
        for reason, names in report.skipped.items():
            for name in names:  # a file or folder
                detail = report.details.get((reason, name))
                reasons.setdefault(name, f"{reason} ({detail})" if detail else reason)
        strays += report.skipped.get(read_report.STRAY_FILE, [])
    # Files outside the image folders that the reader named (e.g. stray files among the annotations).
    skipped = [(name, read_report.STRAY_FILE) for name in strays
               if reasons[name] == read_report.STRAY_FILE and name not in seen and not epath.Path(name).is_dir()]
    for folder in sorted(images_root.iterdir()):
        if folder.name in not_images or not folder.is_dir():
            continue
        files, _ = _walk(folder, {_real(folder): str(folder)})
        skipped += [(str(file), reasons.get(str(file)) or reasons.get(str(file.parent), "not annotated as a gesture"))
                    for file in files if str(file) not in seen]
    return sorted(items, key=lambda i: i.path), sorted(set(skipped))


def _real(folder: epath.Path) -> str:
    """Which folder a name is: its real path on a local disk (object stores have no links)."""
    return str(folder) if "://" in str(folder) else os.path.realpath(folder)


def _walk(folder: epath.Path, listed: dict[str, str]) -> tuple[list[epath.Path], list[tuple[str, str]]]:
    """(every file under `folder`, folders skipped: listed already, or unreadable). `listed` maps the
    real path of each folder entered to the name it was entered by: each folder is entered once, so a
    link to a folder above it (a loop) or beside it lists nothing twice; real folders go before links,
    so a folder's files keep its own name where it can. (epath has no recursive glob on every backend.)"""
    try:
        entries = sorted(folder.iterdir())
    except PermissionError as error:  # one folder of many: the others are still worth predicting
        return [], [(str(folder), f"cannot list this folder ({error.strerror})")]
    files = [entry for entry in entries if not entry.is_dir()]
    repeats = []
    for entry in sorted((e for e in entries if e.is_dir()), key=lambda e: (os.path.islink(e), e.name)):
        real = _real(entry)
        if real in listed:
            repeats.append((str(entry), f"the same folder as {listed[real]}, listed there"))
            continue
        listed[real] = str(entry)
        more_files, more_repeats = _walk(entry, listed)
        files += more_files
        repeats += more_repeats
    return files, repeats


def _with(official: Sequence[str], classes: Sequence[str]) -> tuple[str, ...]:
    return tuple(official) + tuple(name for name in classes if name not in official)


def list_inputs(path: str, classes: Sequence[str] = ()) -> tuple[list[Input], list[tuple[str, str]]]:
    """(inputs, skipped files with the reason), both sorted by file name. In a HaGRID tree the images
    annotated with HaGRID's gestures or with one of `classes` (the run's: a run trained with
    data.classes=present may know other names) are inputs. Elsewhere an image in a folder named as one
    of `classes` is annotated with it, as class folders are for training."""
    root = epath.Path(path)
    if not root.exists():
        raise DataLayoutError(f"config.inputs={path} does not exist; give an image, a folder or a HaGRID tree")
    if root.is_dir() and _is_hagrid(root):
        return _hagrid_inputs(root, classes)
    if root.is_file():
        files, skipped = [root], []
    else:
        # A HaGRID tree that `root` is a part of or holds: read as a plain folder, its images lose their annotations.
        if tree := next((folder for folder in sources.layouts_nearby(root) if _is_hagrid(folder)), None):
            logging.warning("config.inputs=%s is %s the HaGRID tree %s; read as a plain folder, its images have no "
                            "annotations (no gesture box to crop around, no true class to compare with): "
                            "--config.inputs=%s reads them with theirs", path,
                            "in" if tree in root.parents else "one level above", tree, tree)
        files, skipped = _walk(root, {_real(root): str(root)})
    items = []
    for file in sorted(files):
        if any(part.startswith(".") for part in file.relative_to(root).parts) and file != root:
            skipped.append((str(file), "hidden file"))
        elif file.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append((str(file), f"not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})"))
        elif not file.exists() and os.path.islink(file):  # decoding it would only say "no such file"
            skipped.append((str(file), f"a link to {os.readlink(file)}, which does not exist"))
        elif file.exists() and not is_regular_file(file):
            skipped.append((str(file), "not a regular file"))
        else:
            items.append(Input(str(file), annotation=file.parent.name if file.parent.name in classes else ""))
    return items, sorted(skipped)
