"""Specification of the embedded demo dataset."""

import json
import time

import numpy as np
from PIL import Image
import pytest

from gmae_jax.data import synthetic
from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.data.class_folders import scan_split

CLASSES = ("fist", "palm", "like")


def _write(root, **kwargs):
    params = dict(image_size=32, train_per_class=3, val_per_class=2, classes=CLASSES)
    return synthetic.write_demo_dataset(str(root), **{**params, **kwargs})


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*.jpg"))


def test_writes_real_jpegs_with_the_returned_counts(tmp_path):
    counts = _write(tmp_path)

    assert counts == {"train": 9, "val": 6}
    for split in ("train", "val"):
        paths = list((tmp_path / split).rglob("*"))
        assert len([p for p in paths if p.is_file()]) == counts[split]
    for path in (tmp_path / "train").rglob("*.jpg"):
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (32, 32) and img.mode == "RGB"


def test_layout_is_read_back_with_one_label_per_class(tmp_path):
    _write(tmp_path)

    examples = scan_split(str(tmp_path), "val", class_names=CLASSES)

    assert [e.label for e in examples] == [0, 0, 1, 1, 2, 2]


def test_output_is_deterministic_for_a_seed(tmp_path):
    _write(tmp_path / "a", seed=7)
    _write(tmp_path / "b", seed=7)
    _write(tmp_path / "c", seed=8)

    image = "train/palm/00001.jpg"
    same = (tmp_path / "a" / image).read_bytes() == (tmp_path / "b" / image).read_bytes()
    assert same
    assert (tmp_path / "a" / image).read_bytes() != (tmp_path / "c" / image).read_bytes()


def test_images_vary_within_a_class(tmp_path):
    _write(tmp_path)

    paths = sorted((tmp_path / "train/fist").glob("*.jpg"))
    pixels = [np.asarray(Image.open(p), np.float32) for p in paths]

    assert np.abs(pixels[0] - pixels[1]).mean() > 10


def test_writes_1600_images_quickly(tmp_path):
    start = time.perf_counter()
    synthetic.write_demo_dataset(str(tmp_path), image_size=64, train_per_class=200, val_per_class=0)

    assert time.perf_counter() - start < 15  # ~3 s on 2 cores; generous for loaded CI.


def test_unknown_class_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="thumbs_sideways"):
        _write(tmp_path, classes=("fist", "thumbs_sideways"))


def test_ensure_writes_once_and_records_parameters(tmp_path):
    counts = synthetic.ensure_demo_dataset(
        str(tmp_path), image_size=32, train_per_class=2, val_per_class=1
    )

    marker = json.loads((tmp_path / synthetic.MARKER).read_text())
    assert marker["counts"] == counts == {"train": 16, "val": 8}
    assert marker["params"]["train_per_class"] == 2


def test_ensure_reuses_a_complete_dataset(tmp_path, monkeypatch):
    params = dict(image_size=32, train_per_class=2, val_per_class=1, classes=CLASSES)
    first = synthetic.ensure_demo_dataset(str(tmp_path), **params)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")}
    monkeypatch.setattr(synthetic, "_render", pytest.fail)  # Drawing anything fails the test.

    assert synthetic.ensure_demo_dataset(str(tmp_path), **params) == first
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*.jpg")} == before


def test_ensure_redoes_a_write_that_was_killed(tmp_path):
    _write(tmp_path, train_per_class=1)  # Files and the marker of a write under way: it never finished.
    (tmp_path / synthetic.WRITING).write_text("{}")
    stale = tmp_path / "train/fist/00999.jpg"
    stale.write_bytes(b"half written")

    synthetic.ensure_demo_dataset(
        str(tmp_path), image_size=32, train_per_class=2, val_per_class=1, classes=CLASSES
    )

    assert (tmp_path / synthetic.MARKER).exists() and not (tmp_path / synthetic.WRITING).exists()
    assert not stale.exists()
    assert len(_files(tmp_path)) == 9


def test_ensure_refuses_split_folders_that_no_demo_wrote_and_keeps_them(tmp_path):
    notes = tmp_path / "train" / "fist" / "NOTES.txt"
    notes.parent.mkdir(parents=True)
    notes.write_text("my own data")

    with pytest.raises(DataLayoutError, match=f"{tmp_path / 'train'} holds files the demo did not write"):
        synthetic.ensure_demo_dataset(str(tmp_path), image_size=32, train_per_class=2, val_per_class=1,
                                      classes=CLASSES)

    assert notes.read_text() == "my own data"
    assert not (tmp_path / synthetic.MARKER).exists() and not (tmp_path / synthetic.WRITING).exists()


def test_ensure_rewrites_when_parameters_change(tmp_path):
    params = dict(image_size=32, val_per_class=1, classes=CLASSES)
    synthetic.ensure_demo_dataset(str(tmp_path), train_per_class=3, **params)

    counts = synthetic.ensure_demo_dataset(str(tmp_path), train_per_class=1, **params)

    assert counts == {"train": 3, "val": 3}
    assert len(_files(tmp_path)) == 6  # No images left over from the larger dataset.


@pytest.mark.parametrize("name", synthetic.DEMO_CLASSES)
def test_the_hand_box_hugs_the_drawn_hand(name):
    canvas = Image.new("RGB", (128, 128))
    left, top, right, bottom = synthetic._draw_hand(canvas, name, np.random.default_rng(3))
    painted = np.asarray(canvas).any(axis=-1)
    box = painted[max(round(top), 0):round(bottom), max(round(left), 0):round(right)]

    assert box.mean() > 0.3  # mostly hand, little empty frame
    rows, cols = np.nonzero(box)
    margin = 4  # pixels between an edge of the box and the nearest painted pixel
    assert rows.min() <= margin and cols.min() <= margin
    assert box.shape[0] - rows.max() <= margin + 1 and box.shape[1] - cols.max() <= margin + 1


def test_hand_crop_framing_writes_another_view_and_unknown_framings_fail(tmp_path):
    _write(tmp_path / "scene", seed=5)
    _write(tmp_path / "crop", seed=5, framing="hand_crop")
    image = "train/palm/00000.jpg"
    scene, crop = (np.asarray(Image.open(tmp_path / f / image), np.float32) for f in ("scene", "crop"))

    assert crop.shape == scene.shape == (32, 32, 3)
    assert np.abs(scene - crop).mean() > 10  # another view, not the same picture
    with pytest.raises(ValueError, match="framing='tight'"):
        _write(tmp_path / "bad", framing="tight")
