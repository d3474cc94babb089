"""The original G-MAE class-folder layout: `<root>/<split>/<class>/*.{jpg,jpeg,png}`.

Knows files and labels only; decoding and batching live in `transforms` and `pipeline`.
"""

from collections.abc import Sequence
import dataclasses
import os
import unicodedata

from absl import logging
from etils import epath

# What training, evaluation and predict read (torchvision's ImageFolder takes these too, and GIF).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})
# Photos in formats Pillow does not decode without a plugin (phones' HEIC, AVIF): images a user meant to
# train on, named apart from stray files.
UNREADABLE_IMAGE_SUFFIXES = frozenset({".heic", ".heif", ".avif", ".jxl"})
EXPECTED_LAYOUT = "<root>/{train,val}/<class>/*.jpg"


@dataclasses.dataclass(frozen=True)
class Example:
    """One image file and its integer label (the index of its class)."""

    path: str
    label: int


class DataLayoutError(ValueError):
    """The folders on disk do not match the class-folder layout."""


def is_regular_file(path: epath.Path) -> bool:
    """A file whose bytes can be read to the end: not a folder, a pipe or device (a read would wait
    forever), or a link to nothing. (epath's is_file() is true for a local pipe.)"""
    return path.is_file() if "://" in str(path) else os.path.isfile(path)


def _is_hidden(path: epath.Path) -> bool:
    return path.name.startswith(".")


def _split_dir(root: str, split: str) -> epath.Path:
    root_path = epath.Path(root)
    if not root_path.is_dir():
        raise DataLayoutError(
            f"Dataset root {root_path} does not exist or is not a folder; "
            f"expected the layout {EXPECTED_LAYOUT}."
        )
    split_path = root_path / split
    if not split_path.is_dir():
        raise DataLayoutError(
            f"Split folder {split_path} is missing; expected the layout "
            f"{EXPECTED_LAYOUT}. Create it or point the root at the right folder."
        )
    return split_path


def list_classes(root: str, split: str) -> list[str]:
    """Sorted class-folder names of a split; hidden entries and stray files are ignored."""
    split_path = _split_dir(root, split)
    names, files = [], []
    for entry in split_path.iterdir():
        if _is_hidden(entry):
            continue
        (names if entry.is_dir() else files).append(entry.name)
    if files:  # one line, however many (a split of loose images has thousands)
        logging.warning("Ignoring %d file(s) in %s, such as %s: not class folders (a class's images go in "
                        "<split>/<class>/).", len(files), split_path, min(files))
    return sorted(names)


def _check_class_names(
    split_path: epath.Path, found: Sequence[str], expected: Sequence[str], complete: bool
) -> None:
    """A folder of a class the labels do not know is an error, and so is a class without a folder in
    a `complete` split (the training split); elsewhere (e.g. a validation set without one gesture)
    that class only has no examples, which is said once."""
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    if extra or (missing and complete):
        # Names that print alike but differ in bytes: e.g. 'café' as one code point (macOS writes
        # the accent as a second one), or copied between file systems that store names differently.
        same = sorted({name for name in extra if unicodedata.normalize("NFC", name)
                       in {unicodedata.normalize("NFC", m) for m in missing}})
        hint = (f" {same} are the same names written in other Unicode forms (NFC / NFD); rename those folders."
                if same else "")
        raise DataLayoutError(
            f"Class folders in {split_path} do not match the expected classes: "
            f"missing {missing}, unexpected {extra}. The labels know only {list(expected)}"
            + (", and training needs images of each." if complete else ": remove or rename the unexpected folders.")
            + hint
        )
    if missing:
        logging.warning("%s has no folder for the classes %s: none of its examples are of them.", split_path, missing)


def scan_split(
    root: str, split: str, class_names: Sequence[str] | None = None, complete: bool = True,
) -> list[Example]:
    """All images of a split with labels, sorted by (label, file name) for reproducible runs.

    Labels index `class_names` when given (pass the train classes when scanning val so both
    agree), else the sorted class folders. Every class needs images in a `complete` split (one
    trained on); elsewhere a class without a folder or images has no examples, with a warning.
    Hidden and non-image entries are skipped and counted.
    """
    split_path = _split_dir(root, split)
    found = list_classes(root, split)
    if class_names is None:
        class_names = found
    else:
        _check_class_names(split_path, found, class_names, complete)
    if not class_names:
        raise DataLayoutError(
            f"Split folder {split_path} has no class folders; expected the layout "
            f"{EXPECTED_LAYOUT}."
        )

    examples = []
    num_hidden = num_not_image = 0
    other_formats: dict[str, list[str]] = {}  # class -> photos in a format Pillow cannot read
    folders: list[str] = []  # inside class folders: their images are not read
    for label, name in enumerate(class_names):
        class_path = split_path / name
        num_images = 0
        for entry in sorted(class_path.iterdir()) if class_path.is_dir() else []:
            if _is_hidden(entry):
                num_hidden += 1
            elif entry.is_dir():
                folders.append(str(entry))
            elif entry.suffix.lower() in UNREADABLE_IMAGE_SUFFIXES:
                other_formats.setdefault(name, []).append(str(entry))
            elif entry.suffix.lower() not in IMAGE_SUFFIXES or not is_regular_file(entry):
                num_not_image += 1
            else:
                examples.append(Example(path=str(entry), label=label))
                num_images += 1
        if not num_images and not complete:
            if class_path.is_dir():  # a missing folder was warned of above
                logging.warning("Class folder %s holds no images: none of the examples in %s are of it.",
                                class_path, split_path)
        elif not num_images:
            inside = [folder for folder in folders if epath.Path(folder).parent == class_path]
            raise DataLayoutError(
                f"Class folder {class_path} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the "
                "folder from every split"
                + (f" (images in the folders inside it, such as {inside[0]}, are not read: move them up)."
                   if inside else ".")
            )
    if not examples:
        raise DataLayoutError(f"{split_path} holds no images of the classes {list(class_names)}.")
    if other_formats:
        names = [path for paths in other_formats.values() for path in paths]
        logging.warning("Skipped %d images in %s in formats this installation cannot read (%s; e.g. %s): convert "
                        "them to JPEG or PNG to train on them", len(names), split_path,
                        ", ".join(f"{name} {len(paths)}" for name, paths in other_formats.items()), names[0])
    if num_hidden or num_not_image:
        logging.warning(
            "Skipped %d hidden and %d non-image entries in %s.",
            num_hidden,
            num_not_image,
            split_path,
        )
    if folders:
        logging.warning("Skipped %d folder(s) inside class folders of %s, such as %s: a class's images are read "
                        "from its own folder only; move theirs up to count them.", len(folders), split_path,
                        folders[0])
    logging.info(
        "Found %d images in %d classes in %s.", len(examples), len(class_names), split_path
    )
    return examples
