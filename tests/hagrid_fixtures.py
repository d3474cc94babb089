"""Small HaGRID v1 and v2 trees made of real JPEG files and real JSON, plus the awkward cases.

Images are 1/10 of HaGRID's sizes (192x108 for 1920x1080, and portrait / square ones) so a
tree of a few hundred images writes in well under a second.
"""

import dataclasses
import json
import pathlib
import zlib

import numpy as np
from PIL import Image

SIZES = ((192, 108), (108, 192), (160, 120), (96, 96))
EXIF_ORIENTATION = 0x0112


def write_image(path: pathlib.Path, size=(192, 108), mode="RGB", fmt="JPEG", seed=0, exif=None):
    """A gradient with noise in the given PIL mode; `exif` = EXIF orientation tag value."""
    width, height = size
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    pixels = np.stack([x, y, 255 - x], -1) + rng.normal(0, 8, (height, width, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    img = img.convert("P") if mode == "P" else img.convert(mode)
    kwargs = {}
    if exif is not None:
        tags = Image.Exif()
        tags[EXIF_ORIENTATION] = exif
        kwargs["exif"] = tags
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kwargs)
    return path


def entry(labels, boxes=None, user_id="user0", united=None, version="v2", **extra):
    """One annotation in the format of the given HaGRID version; boxes default to a row."""
    if boxes is None:
        boxes = [[0.1 + 0.45 * i, 0.3, 0.2, 0.35] for i in range(len(labels))]
    result = {"bboxes": boxes, "labels": list(labels), "user_id": user_id}
    if version == "v2":
        result["hand_landmarks"] = [[[0.5, 0.5]] * 21 for _ in labels]
        result["meta"] = {"age": [30.0], "gender": ["female"], "race": ["White"]}
        result["united_bbox"] = None if united is None else [united]
        result["united_label"] = None if united is None else [labels[0]]
    else:
        result["landmarks"] = [[] for _ in labels]
        result["leading_hand"] = "right"
        result["leading_conf"] = 1.0
    return {**result, **extra}


@dataclasses.dataclass
class Tree:
    """A HaGRID tree on disk and the annotations written into it, by (split folder, class)."""

    root: pathlib.Path
    version: str
    annotations: dict = dataclasses.field(default_factory=dict)

    @property
    def images_root(self) -> pathlib.Path:
        return self.root / "hagrid_dataset" if self.version == "v2" else self.root

    def image_path(self, cls: str, image_id: str) -> pathlib.Path:
        return self.images_root / cls / f"{image_id}.jpg"

    def json_path(self, split: str, cls: str) -> pathlib.Path:
        if self.version == "v2":
            return self.root / "hagrid_annotations" / split / f"{cls}.json"
        return self.root / split / f"{cls}.json"

    def write_json(self, split: str, cls: str) -> pathlib.Path:
        path = self.json_path(split, cls)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.annotations[(split, cls)], indent=1))
        return path

    def add(self, split, cls, image_id, annotation, size=(192, 108), image=True):
        """Adds one annotated image (and its JPEG unless image=False); returns the image path."""
        self.annotations.setdefault((split, cls), {})[image_id] = annotation
        self.write_json(split, cls)
        path = self.image_path(cls, image_id)
        if image:
            # Distinct pixels per image: equal seeds would make byte-identical (duplicate) files.
            write_image(path, size, seed=zlib.crc32(f"{cls}/{image_id}".encode()))
        return path


def _labels_for(cls: str, index: int, two_handed: frozenset) -> list[str]:
    if cls == "no_gesture":
        return ["no_gesture"]
    if cls in two_handed:
        return [cls, cls]
    return [cls, "no_gesture"] if index % 2 else [cls]


def make_tree(
    root: pathlib.Path,
    version: str = "v2",
    classes=("call", "like", "hand_heart", "no_gesture"),
    num_users: int = 3,
    images_per_user: int = 2,
    splits=None,
    two_handed=frozenset({"hand_heart", "hand_heart2", "thumb_index2", "timeout", "holy",
                          "take_picture", "xsign"}),
) -> Tree:  # fmt: skip
    """Every user shows every class; user k goes to split k % len(splits) (user-disjoint).

    v2 splits default to train/val/test, v1 to the ann_train_val / ann_test sets.
    """
    if splits is None:
        splits = ("train", "val", "test") if version == "v2" else ("ann_train_val", "ann_test")
    tree = Tree(root, version)
    for cls in classes:
        for k in range(num_users):
            split = splits[k % len(splits)]
            for i in range(images_per_user):
                labels = _labels_for(cls, i, two_handed)
                united = [0.1, 0.25, 0.75, 0.45] if cls in two_handed else None
                annotation = entry(labels, user_id=f"user{k:03d}", united=united, version=version)
                size = SIZES[(k + i) % len(SIZES)]
                tree.add(split, cls, f"{cls}-{k:03d}-{i}", annotation, size)
    return tree


# ---- Awkward cases: each returns the path a report or error must name. ----


def inject_missing_image(tree: Tree, split: str, cls: str) -> pathlib.Path:
    """A JSON entry whose image is not on disk."""
    return tree.add(split, cls, "missing-image", entry([cls], version=tree.version), image=False)


def inject_unannotated_image(tree: Tree, cls: str) -> pathlib.Path:
    return write_image(tree.image_path(cls, "unannotated"))


def inject_truncated_jpeg(tree: Tree, split: str, cls: str) -> pathlib.Path:
    path = tree.add(split, cls, "truncated", entry([cls], version=tree.version), size=(192, 108))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def inject_image_mode(tree: Tree, split: str, cls: str, mode: str) -> pathlib.Path:
    """CMYK / L JPEG, or a P / RGBA image saved as PNG under a .jpg name (JPEG cannot hold them)."""
    path = tree.add(split, cls, f"mode-{mode}", entry([cls], version=tree.version))
    write_image(path, mode=mode, fmt="JPEG" if mode in ("CMYK", "L", "RGB") else "PNG")
    return path


def inject_exif_rotated(tree: Tree, split: str, cls: str, size=(192, 108)) -> pathlib.Path:
    """Stored landscape with orientation 6 (rotate 90 degrees): upright it is portrait."""
    path = tree.add(split, cls, "exif-rotated", entry([cls], version=tree.version))
    write_image(path, size, exif=6)
    return path


def inject_boxes(tree: Tree, split: str, cls: str, image_id: str, boxes, labels) -> pathlib.Path:
    """An image with the given raw boxes: partly outside, zero-area, or none at all."""
    annotation = entry(labels, boxes=boxes, version=tree.version)
    return tree.add(split, cls, image_id, annotation)


def inject_unknown_class_folder(tree: Tree, name: str = "waving") -> pathlib.Path:
    write_image(tree.images_root / name / "a.jpg")
    return tree.images_root / name


def inject_macos_files(tree: Tree, cls: str) -> list[pathlib.Path]:
    """A .DS_Store and an AppleDouble `._<name>.jpg` (a .jpg suffix, but no image)."""
    paths = [tree.images_root / cls / ".DS_Store", tree.images_root / cls / "._photo.jpg"]
    for path in paths:
        path.write_bytes(b"\x00\x05\x16\x07Bud1")
    return paths


def inject_empty_class_folder(tree: Tree, cls: str) -> pathlib.Path:
    path = tree.images_root / cls
    path.mkdir(parents=True)
    return path


def inject_invalid_json(tree: Tree, split: str, cls: str) -> pathlib.Path:
    path = tree.json_path(split, cls)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"abc": {"bboxes": [[0.1, 0.2, 0.3')
    return path
