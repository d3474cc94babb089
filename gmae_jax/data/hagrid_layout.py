"""What a HaGRID release looks like on disk: its class lists, splits and folder layouts.

Lists folders only (no JSON, no decoding): which layout a root holds, where its class folders
are, and which class list `config.data.classes` means for it. Knows HaGRID and nothing about JAX.
"""

import itertools
import json
from collections.abc import Iterable, Sequence

from absl import logging
from etils import epath

from gmae_jax.data.class_folders import EXPECTED_LAYOUT, IMAGE_SUFFIXES, DataLayoutError, is_regular_file

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
V2_LAYOUT = "hagrid_dataset/<class>/<id>.jpg + hagrid_annotations/{train,val,test}/<class>.json"
V1_LAYOUT = "{ann_train_val,ann_test,ann_subsample}/<class>.json + <images_dir>/<class>/<id>.jpg"
# config.data.classes: the official list of the layout's HaGRID version, or the class folders found.
OFFICIAL, PRESENT = "hagrid", "present"


class UnknownLayoutError(DataLayoutError):
    """A root in none of the known layouts (callers may add where a known one is nearby)."""


def _image_folders(images_root: epath.Path, exclude: frozenset[str]) -> list[epath.Path]:
    return [f for f in sorted(images_root.iterdir())
            if f.is_dir() and f.name not in exclude and not f.name.startswith(".")]


def is_image(entry: epath.Path) -> bool:
    """A file with an image suffix that is not hidden (macOS leaves `._<id>.jpg` beside images).

    A local entry must also be a regular file (a pipe named `x.jpg` would make its reader wait
    forever); a bucket holds only objects, and a stat per image there would cost a request each.
    """
    if entry.name.startswith(".") or entry.suffix.lower() not in IMAGE_SUFFIXES:
        return False
    return "://" in str(entry) or is_regular_file(entry)


def images_root_of(root: epath.PathLike, layout: str) -> tuple[epath.Path, frozenset[str]]:
    """Where a layout keeps its class folders, and the folders there that are not classes."""
    root = epath.Path(root)
    if layout == "hagrid_v2":
        return root / "hagrid_dataset", frozenset()
    return root, frozenset(V1_ANNOTATION_SETS)


def _annotation_dirs(root: epath.PathLike, layout: str) -> list[epath.Path]:
    """The folders of a layout's `<class>.json` annotation files (present or not)."""
    root = epath.Path(root)
    if layout == "hagrid_v2":
        return [root / "hagrid_annotations" / split for split in V2_SPLITS]
    return [root / name for name in V1_ANNOTATION_SETS]


def resolve_classes(classes: str | Sequence[str], layout: str, root: epath.PathLike) -> list[str]:
    """The class list that `config.data.classes` means for a HaGRID tree (labels index it).

    'hagrid': the official list of the layout's version (a label means the same in every run);
    'present': the class folders that hold images, and the emptied ones that annotation files still
    list images for (so those count as missing, not as an unknown class), sorted, no_gesture last
    as in HaGRID's lists; else the given names (a comma-separated string or a sequence), in their order.
    """
    if isinstance(classes, str) and classes == OFFICIAL:
        return list(HAGRID_V2_CLASSES if layout == "hagrid_v2" else HAGRID_V1_CLASSES)
    if isinstance(classes, str) and classes == PRESENT:
        images_root, exclude = images_root_of(root, layout)
        folders = _image_folders(images_root, exclude)
        names = {f.name for f in folders if any(map(is_image, f.iterdir()))}
        if not names:
            raise DataLayoutError(f"{images_root} holds no class folder with images; config.data.classes=present "
                                  "found no classes.")
        # An emptied folder (a failed extraction?) whose class is annotated stays a class: the
        # dropped-fraction guard then sees its images as missing.
        annotation_dirs = _annotation_dirs(root, layout)
        names |= {f.name for f in folders if any((d / f"{f.name}.json").is_file() for d in annotation_dirs)}
        return in_label_order(names)
    return parse_class_list(classes)


def is_class_list(classes: str | Sequence[str]) -> bool:
    """Whether `config.data.classes` names the classes itself (not 'hagrid' or 'present'): then the
    gestures it leaves out are the user's choice, not images lost."""
    return not (isinstance(classes, str) and classes in (OFFICIAL, PRESENT))


def in_label_order(names: Iterable[str]) -> list[str]:
    """Class names as 'present' orders them: sorted, no_gesture last as in HaGRID's lists."""
    return sorted(sorted(names), key=lambda name: name == NO_GESTURE)


def parse_class_list(classes: str | Sequence[str]) -> list[str]:
    """An explicit `config.data.classes` as a list of unique names; a one-line error otherwise."""
    names = [n.strip() for n in classes.split(",")] if isinstance(classes, str) else [str(n) for n in classes]
    if not all(names) or len(set(names)) != len(names):
        raise DataLayoutError(
            f"config.data.classes={classes!r} must be 'hagrid', 'present' or a list of distinct class names "
            "(e.g. --config.data.classes=call,like,palm).")
    return names


def v1_train_val_set(root: epath.PathLike) -> str:
    """The v1 annotation set that training reads: ann_train_val, or where only HaGRID's
    100-images-per-class sample was downloaded, ann_subsample (logged), also beside every annotation
    archive (ann_train_val would then find most of its images missing and stop the run)."""
    root = epath.Path(root)
    if not (root / "ann_subsample").is_dir():
        return "ann_train_val"
    if not (root / "ann_train_val").is_dir():
        logging.warning("%s has ann_subsample but no ann_train_val: training on the subsample", root)
        return "ann_subsample"
    if _holds_the_subsample_only(root):
        logging.warning("%s holds HaGRID's subsample (its class folders no more images than ann_subsample "
                        "annotates): training on the subsample, not ann_train_val", root)
        return "ann_subsample"
    return "ann_train_val"


def _holds_the_subsample_only(root: epath.Path) -> bool:
    """Whether the first class ann_subsample annotates that has a folder holds no more images than the
    subsample has of it (a full download holds hundreds of times more)."""
    for annotations in sorted((root / "ann_subsample").glob("*.json")):
        folder = root / annotations.stem
        if folder.is_dir():
            try:
                annotated = len(json.loads(annotations.read_text()))
            except (ValueError, OSError):
                return False  # reading it names the file
            on_disk = sum(1 for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
            return 0 < on_disk <= annotated
    return False


def nested_class_folders(root: epath.PathLike, layout: str, max_folders: int = 64) -> epath.Path | None:
    """The folder where a layout's class folders are instead, one level deeper (an archive extracted
    into a folder of its own name: hagrid_dataset/hagrid_dataset/<class>/), or None."""
    images_root, exclude = images_root_of(root, layout)
    known = set(HAGRID_V2_CLASSES)  # v1's gestures are among them
    for folder in itertools.islice(_image_folders(images_root, exclude), max_folders):
        if folder.name not in known and any(child.name in known and child.is_dir()
                                            for child in itertools.islice(folder.iterdir(), max_folders)):
            return folder
    return None


def why_no_images(root: epath.PathLike, layout: str) -> str:
    """A sentence to add where a HaGRID tree gave no usable image: where its class folders are, when
    they are one level too deep, else where the reasons are ('' for other layouts)."""
    if layout not in ("hagrid_v1", "hagrid_v2"):
        return ""
    nested = nested_class_folders(root, layout)
    if nested is None:
        return " The warnings above say what reading left out, and why."
    return (f" Its class folders are one level deeper, in {nested} (an archive extracted into a folder of "
            f"its own name?): move them up into {nested.parent}.")


def is_part_of_a_v2_tree(root: epath.Path) -> bool:
    """`root` is the hagrid_dataset/ or hagrid_annotations/ folder of a v2 tree."""
    return root.name in ("hagrid_dataset", "hagrid_annotations") and all(
        (root.parent / name).is_dir() for name in ("hagrid_dataset", "hagrid_annotations"))


def detect_layout(root: epath.PathLike) -> str:
    """'hagrid_v2', 'hagrid_v1' or 'class_folders', from the folders directly under root."""
    root = epath.Path(root)
    if not root.is_dir():
        raise DataLayoutError(f"Dataset root {root} does not exist or is not a folder.")
    v2_parts = [(root / name).is_dir() for name in ("hagrid_dataset", "hagrid_annotations")]
    if all(v2_parts):
        return "hagrid_v2"
    if any(v2_parts):
        raise DataLayoutError(f"{root} holds only part of the HaGRID v2 layout {V2_LAYOUT}.")
    if any((root / name).is_dir() for name in V1_ANNOTATION_SETS):
        return "hagrid_v1"
    if is_part_of_a_v2_tree(root):
        # hagrid_annotations/ has a train/ folder too: not class folders, the v2 tree one level up.
        raise DataLayoutError(f"{root} is a part of the HaGRID v2 tree in {root.parent}; point the root at "
                              f"{root.parent}.")
    if any((root / split).is_dir() and any((root / split).glob("*.array_record")) for split in ("train", "val")):
        # The prepare stage writes index.json last: shards without it are a preparation that did not finish.
        raise DataLayoutError(f"{root} holds shards of a prepare stage that did not finish (no index.json); rerun "
                              f"the same prepare command (its --workdir is {root.parent}): it goes on where it stopped")
    if (root / "train").is_dir():
        return "class_folders"
    raise UnknownLayoutError(
        f"Cannot tell the layout of {root}; expected one of: HaGRID v2 {V2_LAYOUT}; "
        f"HaGRID v1 {V1_LAYOUT}; class folders {EXPECTED_LAYOUT}."
    )
