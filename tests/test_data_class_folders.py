"""Specification of the class-folder layout reader."""

import logging
import os

import pytest

from gmae_jax.data.class_folders import DataLayoutError, Example, list_classes, scan_split


def _make_tree(root, files):
    """Creates empty files at the given relative paths (scanning never decodes them)."""
    for rel in files:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_labels_index_sorted_class_folders(tmp_path):
    _make_tree(tmp_path, ["train/palm/a.jpg", "train/fist/b.jpg", "train/one/c.png"])

    examples = scan_split(str(tmp_path), "train")

    assert examples == [
        Example(str(tmp_path / "train/fist/b.jpg"), 0),
        Example(str(tmp_path / "train/one/c.png"), 1),
        Example(str(tmp_path / "train/palm/a.jpg"), 2),
    ]


def test_labels_follow_given_class_names_order(tmp_path):
    _make_tree(tmp_path, ["val/fist/a.jpg", "val/palm/b.jpg"])

    examples = scan_split(str(tmp_path), "val", class_names=["palm", "fist"])

    assert [(e.path.split("/")[-2], e.label) for e in examples] == [("palm", 0), ("fist", 1)]


def test_files_within_a_class_are_sorted(tmp_path):
    _make_tree(tmp_path, ["train/one/c.jpg", "train/one/a.jpg", "train/one/b.jpeg"])

    examples = scan_split(str(tmp_path), "train")

    assert [e.path.rsplit("/", 1)[-1] for e in examples] == ["a.jpg", "b.jpeg", "c.jpg"]


def test_upper_case_suffixes_are_images(tmp_path):
    _make_tree(tmp_path, ["train/one/a.JPG", "train/one/b.PNG", "train/one/c.Jpeg"])

    assert len(scan_split(str(tmp_path), "train")) == 3


def test_the_formats_predict_reads_are_training_images_too(tmp_path):
    names = ["a.bmp", "b.webp", "c.gif", "d.tif", "e.TIFF", "f.jpg"]
    _make_tree(tmp_path, [f"train/one/{name}" for name in [*names, "g.txt", "h.svg"]])

    assert [e.path.rsplit("/", 1)[-1] for e in scan_split(str(tmp_path), "train")] == names


def test_a_pipe_named_like_an_image_is_not_read(tmp_path):
    _make_tree(tmp_path, ["train/one/a.jpg"])
    os.mkfifo(tmp_path / "train" / "one" / "b.jpg")  # a loader reading it would wait forever
    assert [e.path.rsplit("/", 1)[-1] for e in scan_split(str(tmp_path), "train")] == ["a.jpg"]


def test_list_classes_ignores_hidden_entries_and_files(tmp_path):
    _make_tree(
        tmp_path, ["train/one/a.jpg", "train/.cache/a.jpg", "train/.DS_Store", "train/notes.txt"]
    )

    assert list_classes(str(tmp_path), "train") == ["one"]


def test_hidden_and_non_image_files_are_skipped_and_counted(tmp_path, caplog):
    _make_tree(
        tmp_path,
        ["train/one/a.jpg", "train/one/.DS_Store", "train/one/labels.csv", "train/one/x.txt"],
    )

    with caplog.at_level(logging.WARNING):
        examples = scan_split(str(tmp_path), "train")

    assert [e.path.rsplit("/", 1)[-1] for e in examples] == ["a.jpg"]
    assert "Skipped 1 hidden and 2 non-image entries" in caplog.text


def test_phone_photos_in_formats_pillow_cannot_read_are_named_apart_from_stray_files(tmp_path, caplog):
    """20 iPhone photos of one class vanished as 'non-image entries', the class balance changed unseen."""
    _make_tree(tmp_path, ["train/one/a.jpg", "train/one/b.jfif", "train/palm/c.jpg", "train/palm/IMG_1.HEIC",
                          "train/palm/IMG_2.heic", "train/palm/notes.txt"])
    with caplog.at_level(logging.WARNING):
        examples = scan_split(str(tmp_path), "train")
    assert [e.path.rsplit("/", 1)[-1] for e in examples] == ["a.jpg", "b.jfif", "c.jpg"]  # .jfif: a JPEG
    assert (f"Skipped 2 images in {tmp_path / 'train'} in formats this installation cannot read (palm 2; e.g. "
            f"{tmp_path / 'train' / 'palm' / 'IMG_1.HEIC'}): convert them to JPEG or PNG") in caplog.text
    assert "Skipped 0 hidden and 1 non-image entries" in caplog.text


def test_images_in_folders_inside_a_class_folder_are_named_not_read(tmp_path, caplog):
    """They were counted as one 'non-image entry' each folder, their images not at all."""
    _make_tree(tmp_path, ["train/one/a.jpg", "train/one/more/b.jpg", "train/one/more/c.jpg", "train/palm/d/e.jpg"])

    with pytest.raises(DataLayoutError, match=r"palm holds no images .* \(images in the folders inside it, such as "
                                              r".*train/palm/d, are not read: move them up\)\."):
        scan_split(str(tmp_path), "train")
    os.remove(tmp_path / "train" / "palm" / "d" / "e.jpg")
    os.rmdir(tmp_path / "train" / "palm" / "d")
    os.rmdir(tmp_path / "train" / "palm")
    with caplog.at_level(logging.WARNING):
        examples = scan_split(str(tmp_path), "train")
    assert [e.path.rsplit("/", 1)[-1] for e in examples] == ["a.jpg"]
    assert (f"Skipped 1 folder(s) inside class folders of {tmp_path / 'train'}, such as "
            f"{tmp_path / 'train' / 'one' / 'more'}: a class's images are read from its own folder only") in caplog.text
    assert "non-image" not in caplog.text


def test_missing_root_error_gives_expected_layout(tmp_path):
    with pytest.raises(DataLayoutError, match=r"nowhere.*<root>/\{train,val\}/<class>/\*\.jpg"):
        scan_split(str(tmp_path / "nowhere"), "train")


def test_missing_split_error_names_split_folder(tmp_path):
    _make_tree(tmp_path, ["train/one/a.jpg"])

    with pytest.raises(DataLayoutError, match=r"val.*<root>/\{train,val\}/<class>/\*\.jpg"):
        scan_split(str(tmp_path), "val")


def test_class_folder_without_images_is_an_error_naming_it(tmp_path):
    _make_tree(tmp_path, ["train/one/a.jpg", "train/palm/readme.txt"])

    with pytest.raises(DataLayoutError, match="palm holds no images"):
        scan_split(str(tmp_path), "train")


def test_split_without_class_folders_is_an_error(tmp_path):
    (tmp_path / "train").mkdir()

    with pytest.raises(DataLayoutError, match="no class folders"):
        scan_split(str(tmp_path), "train")


def test_class_mismatch_names_missing_and_extra_folders(tmp_path):
    _make_tree(tmp_path, ["val/fist/a.jpg", "val/rock/b.jpg"])

    with pytest.raises(DataLayoutError, match=r"missing \['palm'\], unexpected \['rock'\]. The labels know only "
                       r"\['fist', 'palm'\]"):
        scan_split(str(tmp_path), "val", class_names=["fist", "palm"], complete=False)
    with pytest.raises(DataLayoutError, match=r"missing \['palm'\], unexpected \[\]. .*training needs images of each"):
        scan_split(str(tmp_path), "val", class_names=["fist", "palm", "rock"])


def test_an_evaluation_split_without_some_of_the_given_classes_has_no_examples_of_them(tmp_path, caplog):
    _make_tree(tmp_path, ["val/fist/a.jpg", "val/one/readme.txt"])  # no palm folder, no image of one

    with caplog.at_level(logging.WARNING):
        examples = scan_split(str(tmp_path), "val", class_names=["fist", "one", "palm"], complete=False)

    assert examples == [Example(str(tmp_path / "val/fist/a.jpg"), 0)]
    assert "no folder for the classes ['palm']" in caplog.text and "one holds no images" in caplog.text
    assert "palm holds no images" not in caplog.text  # a folder that is not there: said once, above
    _make_tree(tmp_path / "none", ["val/one/readme.txt"])
    with pytest.raises(DataLayoutError, match=r"holds no images of the classes \['one', 'palm'\]"):
        scan_split(str(tmp_path / "none"), "val", class_names=["one", "palm"], complete=False)
    with pytest.raises(DataLayoutError, match="one holds no images"):  # a training split needs every class
        scan_split(str(tmp_path), "val", class_names=["fist", "one"])


def test_loose_files_in_a_split_are_one_warning_not_one_each(tmp_path, caplog):
    _make_tree(tmp_path, ["train/one/a.jpg"] + [f"train/loose{i:02d}.jpg" for i in range(50)])

    with caplog.at_level(logging.WARNING):
        assert list_classes(str(tmp_path), "train") == ["one"]
    lines = [r.getMessage() for r in caplog.records if "Ignoring" in r.getMessage()]
    assert lines == [f"Ignoring 50 file(s) in {tmp_path / 'train'}, such as loose00.jpg: not class folders (a "
                     "class's images go in <split>/<class>/)."]


def test_a_class_spelled_in_another_unicode_form_is_named_as_such(tmp_path):
    nfc, nfd = "caf\u00e9", "cafe\u0301"  # what prints as 'café' either way
    _make_tree(tmp_path, [f"train/{nfc}/a.jpg", "train/one/b.jpg", f"val/{nfd}/c.jpg", "val/one/d.jpg"])

    with pytest.raises(DataLayoutError, match=r"\['cafe\u0301'\] are the same names written in other Unicode "
                                              r"forms \(NFC / NFD\); rename those folders\."):
        scan_split(str(tmp_path), "val", class_names=[nfc, "one"], complete=False)


def test_a_class_list_given_for_class_folders_is_refused_not_ignored(tmp_path):
    """It trained on every folder, the listed classes or not."""
    from gmae_jax import schema
    from gmae_jax.data import sources

    _make_tree(tmp_path, ["train/palm/a.jpg", "train/fist/b.jpg", "val/palm/c.jpg", "val/fist/d.jpg"])
    data = schema.DataConfig(root=str(tmp_path), classes="fist,onee")
    with pytest.raises(DataLayoutError, match=f"config.data.classes='fist,onee' chooses classes of HaGRID layouts; "
                                              f"{tmp_path} holds class folders, each folder under {tmp_path}/train"):
        sources.open_sources(data)
    names, _, _ = sources.open_sources(schema.DataConfig(root=str(tmp_path), classes="present"))
    assert names == ["fist", "palm"]
    # A run's own classes (evaluate) are its classes.json, whatever it was trained with.
    assert len(sources.open_split(data, "val", ["fist", "palm"])) == 2
