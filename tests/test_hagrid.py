"""Specification of the HaGRID readers, label rule, hand crops, letterboxing and user splits."""

import collections
import os
import re

import hagrid_fixtures as fx
import numpy as np
from PIL import Image
import pytest

from gmae_jax import schema
from gmae_jax.data import crops, frames, hagrid, hagrid_layout, read_report, record_filters, sources, splits, transforms
from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.data.hagrid import HagridRecord
from gmae_jax.train import steps


def _record(labels, boxes=None, folder=None, united=None, user="u0", image_id="x"):
    boxes = boxes or [(0.1 + 0.4 * i, 0.3, 0.2, 0.3) for i in range(len(labels))]
    return HagridRecord(
        image_id=image_id,
        path=f"/data/{folder or labels[0]}/{image_id}.jpg",
        class_folder=folder or labels[0],
        user_id=user,
        boxes=tuple(tuple(b) for b in boxes),
        labels=tuple(labels),
        united_box=united,
        united_label=labels[0] if united else None,
    )


def _v2(tmp_path, **kwargs):
    return fx.make_tree(tmp_path, "v2", **kwargs)


def _v1(tmp_path, **kwargs):
    return fx.make_tree(tmp_path, "v1", classes=("call", "like", "palm"), **kwargs)


# ---- Layout detection ----


def test_detect_layout_recognises_v2(tmp_path):
    _v2(tmp_path, num_users=1, images_per_user=1)
    assert hagrid_layout.detect_layout(tmp_path) == "hagrid_v2"


def test_detect_layout_recognises_v1(tmp_path):
    _v1(tmp_path, num_users=1, images_per_user=1)
    assert hagrid_layout.detect_layout(tmp_path) == "hagrid_v1"


def test_detect_layout_recognises_class_folders(tmp_path):
    fx.write_image(tmp_path / "train" / "palm" / "a.jpg")
    assert hagrid_layout.detect_layout(tmp_path) == "class_folders"


def test_detect_layout_error_names_all_expected_layouts(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DataLayoutError, match=r"hagrid_annotations.*ann_train_val.*\{train,val\}"):
        hagrid_layout.detect_layout(tmp_path)


def test_detect_layout_half_a_v2_tree_is_an_error(tmp_path):
    (tmp_path / "hagrid_dataset").mkdir()
    with pytest.raises(DataLayoutError, match="part of the HaGRID v2 layout"):
        hagrid_layout.detect_layout(tmp_path)


# ---- Classes and readers ----


def test_class_lists_follow_the_format_doc():
    assert len(hagrid_layout.HAGRID_V1_CLASSES) == 19 and len(hagrid_layout.HAGRID_V2_CLASSES) == 34
    assert hagrid_layout.HAGRID_V2_CLASSES[:18] == hagrid_layout.HAGRID_V1_CLASSES[:18]
    assert hagrid_layout.HAGRID_V1_CLASSES[-1] == hagrid_layout.HAGRID_V2_CLASSES[-1] == "no_gesture"
    assert hagrid_layout.HAGRID_V2_CLASSES[18:33:14] == ("grabbing", "thumb_index2")
    assert len(set(hagrid_layout.HAGRID_V2_CLASSES)) == 34
    assert hagrid_layout.TWO_HANDED <= set(hagrid_layout.HAGRID_V2_CLASSES) - set(hagrid_layout.HAGRID_V1_CLASSES)


def test_read_v2_takes_the_split_from_the_annotation_folder(tmp_path):
    tree = _v2(tmp_path)

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert len(records) == 4 * 3 * 2 and report.skipped == {} and report.num_records == 24
    by_split = collections.defaultdict(set)
    for r in records:
        by_split[r.split].add(r.user_id)
        assert r.path == str(tree.image_path(r.class_folder, r.image_id))
    assert by_split == {"train": {"user000"}, "val": {"user001"}, "test": {"user002"}}


def test_read_v2_keeps_boxes_labels_and_united_box(tmp_path):
    tree = _v2(tmp_path, num_users=1, images_per_user=2)

    records = {r.image_id: r for r in hagrid.read_hagrid_v2(tmp_path)[0]}

    two = records["hand_heart-000-0"]
    assert two.labels == ("hand_heart", "hand_heart")
    assert two.united_box == pytest.approx((0.1, 0.25, 0.75, 0.45))
    assert two.united_label == "hand_heart"
    one = records["call-000-1"]
    expected = tree.annotations[("train", "call")]["call-000-1"]["bboxes"]
    assert one.labels == ("call", "no_gesture") and one.united_box is None
    assert np.allclose(one.boxes, expected)


def test_read_v2_selected_splits_do_not_report_other_splits_as_unannotated(tmp_path):
    _v2(tmp_path)

    records, report = hagrid.read_hagrid_v2(tmp_path, splits=["val"])

    assert {r.split for r in records} == {"val"} and len(records) == 8
    assert read_report.UNANNOTATED not in report.skipped


def test_read_v2_missing_split_folder_is_an_error(tmp_path):
    _v2(tmp_path, splits=("train", "val"))
    with pytest.raises(hagrid.MissingSplitsError, match=r"\['test'\] are missing") as raised:
        hagrid.read_hagrid_v2(tmp_path, splits=["train", "test"])

    # What a caller needs to name the flag that asked for the split (sources does).
    assert isinstance(raised.value, DataLayoutError)
    assert (raised.value.missing, raised.value.present) == (["test"], ["train", "val"])


def test_read_v2_ignores_unknown_json_keys(tmp_path):
    tree = _v2(tmp_path, num_users=1, images_per_user=1)
    annotation = fx.entry(["like"], user_id="u9", gaze={"x": 1}, leading_hand="left")
    tree.add("train", "like", "extra-keys", annotation)

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert "extra-keys" in {r.image_id for r in records} and report.skipped == {}


def test_read_v1_train_val_has_no_split_and_test_is_test(tmp_path):
    _v1(tmp_path)

    train_val, report = hagrid.read_hagrid_v1(tmp_path)
    test, _ = hagrid.read_hagrid_v1(tmp_path, annotation_set="ann_test")

    assert {r.split for r in train_val} == {""} and {r.split for r in test} == {"test"}
    assert len(train_val) == 3 * 2 * 2 and len(test) == 3 * 1 * 2
    assert report.skipped == {}  # the ann_test images count as annotated


def test_read_v1_images_can_live_in_another_folder(tmp_path):
    tree = _v1(tmp_path / "elsewhere", num_users=1, splits=("ann_train_val",))
    (tmp_path / "elsewhere" / "ann_train_val").rename(tmp_path / "ann_train_val")

    records, report = hagrid.read_hagrid_v1(tmp_path, images_dir="elsewhere")

    assert len(records) == 6 and report.skipped == {}
    assert all(r.path.startswith(str(tree.root)) for r in records)


def test_read_v1_unknown_annotation_set_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="ann_val"):
        hagrid.read_hagrid_v1(tmp_path, annotation_set="ann_val")


# ---- The full-frame label rule ----


def test_label_is_the_first_label_that_is_not_no_gesture():
    record = _record(["no_gesture", "peace"], folder="peace")
    assert record_filters.gesture_label(record, hagrid_layout.HAGRID_V1_CLASSES) == 9


def test_only_no_gesture_in_the_no_gesture_folder_is_no_gesture():
    record = _record(["no_gesture", "no_gesture"], folder="no_gesture")
    assert record_filters.gesture_label(record, hagrid_layout.HAGRID_V2_CLASSES) == 33


def test_only_no_gesture_in_a_gesture_folder_has_no_label():
    record = _record(["no_gesture"], folder="call")
    assert record_filters.gesture_label(record, hagrid_layout.HAGRID_V2_CLASSES) is None


def test_label_outside_the_class_list_has_no_label():
    record = _record(["hand_heart", "hand_heart"])
    assert record_filters.gesture_label(record, hagrid_layout.HAGRID_V1_CLASSES) is None


def test_labels_of_a_read_tree_match_their_folders(tmp_path):
    _v2(tmp_path)
    records, _ = hagrid.read_hagrid_v2(tmp_path)
    classes = hagrid_layout.HAGRID_V2_CLASSES
    assert all(classes[record_filters.gesture_label(r, classes)] == r.class_folder for r in records)


# ---- Awkward cases: skipped and named, repaired and named, or a clear error ----


def test_image_listed_but_missing_is_skipped_and_named(tmp_path):
    tree = _v2(tmp_path)
    path = fx.inject_missing_image(tree, "train", "call")

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped == {read_report.MISSING_IMAGE: [str(path)]} and len(records) == 24


def test_image_without_annotation_is_skipped_and_named(tmp_path):
    tree = _v1(tmp_path)
    path = fx.inject_unannotated_image(tree, "palm")

    records, report = hagrid.read_hagrid_v1(tmp_path)

    assert report.skipped == {read_report.UNANNOTATED: [str(path)]}
    assert str(path) not in {r.path for r in records}


def test_images_of_a_missing_annotation_file_are_unannotated_naming_that_file(tmp_path):
    """'unannotated 12 (like 12)' alone sends a user looking at the images, not at the absent JSON."""
    _v2(tmp_path, num_users=3)  # user 0 in train, 1 in val, 2 in test
    missing = tmp_path / "hagrid_annotations" / "train" / "like.json"
    missing.unlink()
    records, report = hagrid.read_hagrid_v2(tmp_path)
    names = report.skipped[read_report.UNANNOTATED]
    assert len(names) == 2 and all("/like/" in name for name in names)
    assert report.described(read_report.UNANNOTATED, names[:1]) == [f"{names[0]}: {missing} does not exist"]
    with pytest.raises(DataLayoutError, match=rf"\(e\.g\. unannotated: .*like.*: {re.escape(str(missing))} does not "
                       r"exist"):
        report.check_dropped(0.0, str(tmp_path))


def test_gestures_left_out_of_a_written_class_list_are_a_choice_not_a_loss(tmp_path, caplog):
    """Half the tree's folders left out on purpose stopped the run as 'dropped'."""
    _v2(tmp_path, classes=("call", "like", "peace", "palm"), num_users=3)
    chosen = "call,like,no_gesture"
    _, report = hagrid.read_hagrid_v2(tmp_path, ["train", "val"], class_names=chosen.split(","))
    with pytest.raises(DataLayoutError, match=r"unknown_class 8 \(.*\) \(e\.g\. unknown_class: "):
        report.check_dropped(0.05, str(tmp_path))  # the official list's reading: other folders are a loss
    with caplog.at_level("WARNING"):
        report.check_dropped(0.05, str(tmp_path), chosen_classes=hagrid_layout.is_class_list(chosen))
    assert re.search(r"8 images of gestures outside config.data.classes are left out \(unknown_class: "
                     r"\{'palm': 4, 'peace': 4\}\)", caplog.text)
    assert not hagrid_layout.is_class_list("hagrid") and not hagrid_layout.is_class_list("present")


def test_a_folder_of_another_gesture_counts_only_the_images_of_the_splits_read(tmp_path):
    """Its test images were counted as dropped where the kept ones were train and val only: 'waving 6 of 12'
    for a third of the tree."""
    _v2(tmp_path, classes=("call", "like", "waving"), num_users=3)  # one user per split, 2 images each
    _, report = hagrid.read_hagrid_v2(tmp_path, ["train", "val"])
    assert report.num_records == 8 and report.dropped_images()[read_report.UNKNOWN_CLASS] == {"waving": 4}
    _, report = hagrid.read_hagrid_v2(tmp_path)
    assert report.num_records == 12 and report.dropped_images()[read_report.UNKNOWN_CLASS] == {"waving": 6}


def test_truncated_jpeg_is_kept_by_the_reader_and_its_decode_names_the_file(tmp_path):
    tree = _v2(tmp_path, num_users=1, images_per_user=1)
    path = fx.inject_truncated_jpeg(tree, "train", "like")
    records, _ = hagrid.read_hagrid_v2(tmp_path)

    assert str(path) in {r.path for r in records}  # reading annotations never opens images
    with pytest.raises(transforms.ImageDecodeError, match=re.escape(str(path))):
        transforms.decode_rgb(str(path))  # the full decode the prepare stage and the loaders do


@pytest.mark.parametrize("mode", ["CMYK", "L", "P", "RGBA"])
def test_unusual_colour_modes_are_read_and_decode_to_rgb(tmp_path, mode):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    path = fx.inject_image_mode(tree, "train", "call", mode)
    records, _ = hagrid.read_hagrid_v2(tmp_path)

    assert str(path) in {r.path for r in records}
    with Image.open(path) as raw:
        assert raw.mode == mode
    assert transforms.decode_rgb(path).mode == "RGB"


def test_exif_rotated_photo_is_read_and_decodes_upright(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    path = fx.inject_exif_rotated(tree, "train", "call", size=(192, 108))
    records, _ = hagrid.read_hagrid_v2(tmp_path)

    assert len(records) == 2 and str(path) in {r.path for r in records}
    assert transforms.decode_rgb(path).size == (108, 192)


def test_box_partly_outside_is_clipped_and_named(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    path = fx.inject_boxes(tree, "train", "call", "edge", [[-0.1, 0.8, 0.3, 0.4]], ["call"])

    records, report = hagrid.read_hagrid_v2(tmp_path)

    edge = next(r for r in records if r.image_id == "edge")
    assert np.allclose(edge.boxes, [(0.0, 0.8, 0.2, 0.2)])
    assert report.repaired == {read_report.CLIPPED_BOX: [str(path)]} and report.skipped == {}


def test_zero_area_box_is_dropped_with_its_label(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    boxes = [[0.2, 0.2, 0.0, 0.3], [0.5, 0.5, 0.2, 0.2], [1.2, 0.1, 0.1, 0.1]]
    path = fx.inject_boxes(tree, "train", "call", "thin", boxes, ["no_gesture", "call", "call"])

    records, report = hagrid.read_hagrid_v2(tmp_path)

    thin = next(r for r in records if r.image_id == "thin")
    assert thin.labels == ("call",) and np.allclose(thin.boxes, [(0.5, 0.5, 0.2, 0.2)])
    assert report.repaired == {read_report.DROPPED_BOX: [str(path), str(path)]}


@pytest.mark.parametrize("boxes", [[], [[0.3, 0.3, 0.2, 0.0]]], ids=["empty", "all_zero_area"])
def test_image_without_usable_boxes_is_skipped_and_named(tmp_path, boxes):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    path = fx.inject_boxes(tree, "train", "call", "nobox", boxes, ["call"] * len(boxes))

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped == {read_report.EMPTY_BBOXES: [str(path)]}
    assert "nobox" not in {r.image_id for r in records}


def test_unknown_class_folder_is_skipped_and_named(tmp_path):
    tree = _v2(tmp_path, num_users=1, images_per_user=1)
    folder = fx.inject_unknown_class_folder(tree, "waving")

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped == {read_report.UNKNOWN_CLASS: [str(folder)]} and len(records) == 4


def test_annotation_file_of_an_unknown_class_is_skipped_and_named(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    tree.add("train", "waving", "w1", fx.entry(["call"]), image=False)

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped == {read_report.UNKNOWN_CLASS: [str(tree.json_path("train", "waving"))]}
    assert len(records) == 1


def test_unknown_box_label_is_skipped_and_named(tmp_path):
    tree = _v1(tmp_path, num_users=1, images_per_user=1)
    path = fx.inject_boxes(tree, "ann_train_val", "call", "odd", [[0.1, 0.1, 0.2, 0.2]], ["wave"])

    records, report = hagrid.read_hagrid_v1(tmp_path)

    assert report.skipped.keys() == {read_report.UNKNOWN_LABEL} and len(records) == 3
    # The name is the image's whole path; what was wrong is kept apart, and joined for people.
    assert report.skipped[read_report.UNKNOWN_LABEL] == [str(path)]
    assert report.details[(read_report.UNKNOWN_LABEL, str(path))] == "['wave']"
    assert report.described(read_report.UNKNOWN_LABEL, [str(path)]) == [f"{path}: ['wave']"]


@pytest.mark.parametrize(
    "boxes, labels",
    [
        ([[0.1, 0.1, 0.2, 0.2]] * 2, ["call"]),
        ([[0.1, 0.1, 0.2]], ["call"]),
        ([[0.1, float("nan"), 0.2, 0.2]], ["call"]),
        ([[0.1, "top", 0.2, 0.2]], ["call"]),
        ([[0.1, 0.1, 0.2, 0.2]], [7]),
    ],
    ids=["length_mismatch", "three_numbers", "nan", "string", "numeric_label"],
)
def test_malformed_entry_is_skipped_and_named(tmp_path, boxes, labels):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    path = fx.inject_boxes(tree, "train", "call", "bad", boxes, labels)

    _, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped.keys() == {read_report.MALFORMED_ENTRY}
    assert report.skipped[read_report.MALFORMED_ENTRY] == [str(path)]
    assert "Error(" in report.details[(read_report.MALFORMED_ENTRY, str(path))]


@pytest.mark.parametrize("united_label", [[["call"]], 5], ids=["nested_list", "number"])
def test_an_odd_united_label_is_a_malformed_entry_not_a_crash(tmp_path, united_label):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    annotation = fx.entry(["call"], united=[0.1, 0.1, 0.5, 0.5])
    annotation["united_label"] = united_label
    path = tree.add("train", "call", "odd", annotation)

    _, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped.keys() == {read_report.MALFORMED_ENTRY}
    assert report.skipped[read_report.MALFORMED_ENTRY] == [str(path)]
    assert "united_label must be a string" in report.details[(read_report.MALFORMED_ENTRY, str(path))]


def test_a_pipe_named_like_an_image_is_skipped_not_read(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=2)
    pipe = sorted((tree.images_root / "call").iterdir())[0]
    pipe.unlink()
    os.mkfifo(pipe)  # decoding it would wait forever

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert str(pipe) in report.skipped[read_report.STRAY_FILE]
    assert pipe.stem not in {r.image_id for r in records} and len(records) == 1


def test_macos_metadata_files_are_skipped_and_named(tmp_path):
    tree = _v2(tmp_path, num_users=1, images_per_user=1)
    in_class = fx.inject_macos_files(tree, "call")
    top = tree.images_root / ".DS_Store"
    top.write_bytes(b"Bud1")
    in_annotations = tree.json_path("train", "call").parent / ".DS_Store"
    in_annotations.write_bytes(b"Bud1")

    records, report = hagrid.read_hagrid_v2(tmp_path)

    expected = sorted(map(str, [*in_class, top, in_annotations]))
    assert sorted(report.skipped[read_report.STRAY_FILE]) == expected
    assert report.skipped.keys() == {read_report.STRAY_FILE} and len(records) == 4


def test_empty_class_folder_is_skipped_and_named(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1, images_per_user=1)
    folder = fx.inject_empty_class_folder(tree, "palm")

    _, report = hagrid.read_hagrid_v2(tmp_path)

    assert report.skipped == {read_report.EMPTY_CLASS_FOLDER: [str(folder)]}


def test_annotated_images_of_an_emptied_class_folder_count_as_missing(tmp_path):
    tree = _v2(tmp_path, classes=("call", "like"))
    for image in (tree.images_root / "like").iterdir():
        image.unlink()  # the folder stays, its annotation files still list 6 images

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert len(records) == 6 and report.dropped_images()[read_report.MISSING_IMAGE] == {"like": 6}
    with pytest.raises(DataLayoutError, match=r"6 of 12 images .* missing_image 6"):
        report.check_dropped(0.05, str(tmp_path))


def test_classes_present_keeps_an_emptied_class_folder_that_is_annotated(tmp_path):
    tree = _v2(tmp_path, classes=("call", "like"))
    for image in (tree.images_root / "like").iterdir():
        image.unlink()  # annotated, so its images count as missing rather than vanish with the class
    fx.inject_empty_class_folder(tree, "palm")  # in no annotation file: not a class

    names = hagrid_layout.resolve_classes("present", "hagrid_v2", tmp_path)
    _, report = hagrid.read_hagrid_v2(tmp_path, class_names=names)

    assert names == ["call", "like"] and report.dropped_images()[read_report.MISSING_IMAGE] == {"like": 6}


def test_an_image_annotated_in_two_splits_is_kept_in_the_first_only(tmp_path):
    tree = _v2(tmp_path, classes=("call", "like"))
    tree.annotations[("val", "call")]["call-000-0"] = tree.annotations[("train", "call")]["call-000-0"]
    val_json = tree.write_json("val", "call")

    records, report = hagrid.read_hagrid_v2(tmp_path)
    val, val_report = hagrid.read_hagrid_v2(tmp_path, splits=["val"])

    assert [r.split for r in records if r.image_id == "call-000-0"] == ["train"]
    image = str(tree.images_root / "call" / "call-000-0.jpg")  # the name is the image's path
    assert report.skipped[read_report.IN_TWO_SPLITS] == [image]
    assert report.described(read_report.IN_TWO_SPLITS, [image]) == [
        f"{image}: call-000-0 annotated again in {val_json} (kept in {tree.json_path('train', 'call')})"]
    assert "call-000-0" not in {r.image_id for r in val} and read_report.IN_TWO_SPLITS in val_report.skipped
    assert len(records) == 12


def test_v1s_subsample_repeating_train_val_ids_is_not_a_conflict(tmp_path):
    tree = _v1(tmp_path)
    tree.annotations[("ann_subsample", "call")] = dict(list(tree.annotations[("ann_train_val", "call")].items())[:2])
    tree.write_json("ann_subsample", "call")

    train_val, report = hagrid.read_hagrid_v1(tmp_path)
    subsample, _ = hagrid.read_hagrid_v1(tmp_path, annotation_set="ann_subsample")

    assert len(train_val) == 12 and report.skipped == {} and len(subsample) == 2


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_invalid_json_is_an_error_naming_the_file(tmp_path, version):
    tree = fx.make_tree(tmp_path, version, classes=("call", "like"), num_users=1)
    split = "train" if version == "v2" else "ann_train_val"
    path = fx.inject_invalid_json(tree, split, "like")
    read = hagrid.read_hagrid_v2 if version == "v2" else hagrid.read_hagrid_v1

    with pytest.raises(hagrid.AnnotationError, match=f"{path}.*not valid JSON"):
        read(tmp_path)


def test_json_that_is_not_an_object_is_an_error_naming_the_file(tmp_path):
    tree = _v2(tmp_path, classes=("call",), num_users=1)
    tree.json_path("val", "call").parent.mkdir(parents=True, exist_ok=True)
    tree.json_path("val", "call").write_text("[1, 2]")
    with pytest.raises(hagrid.AnnotationError, match=r"val/call\.json holds a list"):
        hagrid.read_hagrid_v2(tmp_path)


@pytest.mark.parametrize("kind", ["folder", "pipe", "broken link"])
def test_an_annotation_file_that_is_no_file_is_an_error_naming_it(tmp_path, kind):
    """A pipe blocked the read forever; a folder or a broken link was a traceback."""
    tree = _v2(tmp_path, classes=("call", "like"), num_users=1)
    path = tree.json_path("train", "like")
    path.unlink()
    {"folder": path.mkdir, "pipe": lambda: os.mkfifo(path),
     "broken link": lambda: path.symlink_to(tmp_path / "nowhere.json")}[kind]()
    with pytest.raises(hagrid.AnnotationError, match=f"Annotation file {path} is no regular file"):
        hagrid.read_hagrid_v2(tmp_path)


def test_a_prepared_index_that_is_no_file_is_one_line(tmp_path):
    (tmp_path / sources.INDEX_FILE).mkdir()
    with pytest.raises(DataLayoutError, match=r"index.json is damaged \(it is no regular file"):
        sources.open_sources(schema.DataConfig(root=str(tmp_path)))


# ---- Hand crops and letterboxing ----


@pytest.mark.parametrize(
    "box", [(0.1, 0.2, 0.2, 0.3), (0.0, 0.0, 0.05, 0.4), (0.85, 0.9, 0.15, 0.1)]
)
@pytest.mark.parametrize("scale", [1.0, 1.37, 2.0])
def test_hand_crop_is_a_square_containing_the_box(box, scale):
    width, height = 192, 108
    left, top, side = frames.hand_crop_box(box, width, height, scale)

    x, y, w, h = box[0] * width, box[1] * height, box[2] * width, box[3] * height
    assert left <= x and top <= y and left + side >= x + w and top + side >= y + h
    assert max(w, h) * scale <= side <= max(w, h) * scale + 2
    assert abs((left + side / 2) - (x + w / 2)) <= 1 and abs((top + side / 2) - (y + h / 2)) <= 1


def test_crop_scale_stays_in_its_range_and_varies():
    rng = np.random.default_rng(0)
    scales = [crops.sample_crop_scale(rng, 1.0, 2.0) for _ in range(500)]
    assert 1.0 <= min(scales) < 1.1 and 1.9 < max(scales) <= 2.0
    assert crops.EVAL_CROP_SCALE == 1.0


def test_crop_of_the_box_shows_the_box():
    img = Image.new("RGB", (192, 108), (0, 0, 0))
    img.paste((255, 0, 0), (40, 30, 80, 70))  # a 40x40 red "hand"

    square = frames.hand_crop_box((40 / 192, 30 / 108, 40 / 192, 40 / 108), 192, 108, 1.0)

    out = np.asarray(crops.crop_square(img, *square, 32))

    assert out.shape == (32, 32, 3) and (out[2:-2, 2:-2] == (255, 0, 0)).all()


def test_crop_leaving_the_image_is_padded_with_the_fill_colour():
    img = Image.new("RGB", (100, 60), (10, 200, 30))

    # The square spans x in [-50, 50) and y in [-20, 80): it leaves the image left, top, bottom.
    out = np.asarray(crops.crop_square(img, -50, -20, 100, 50))

    assert (out[:, :25] == crops.FILL).all()
    assert (out[:10] == crops.FILL).all() and (out[40:] == crops.FILL).all()
    assert (out[10:40, 25:] == (10, 200, 30)).all()


def test_hand_crop_at_the_border_is_padded_where_it_leaves_the_image():
    img = Image.new("RGB", (192, 108), (0, 0, 255))
    box = (0.85, 0.9, 0.15, 0.1)  # touches the right and bottom edges

    square = frames.hand_crop_box(box, 192, 108, 2.0)
    out = np.asarray(crops.crop_square(img, *square, 64))

    assert square[0] + square[2] > 192 and square[1] + square[2] > 108
    assert (out[-8:, -8:] == crops.FILL).all() and (out[:8, :8] == (0, 0, 255)).all()


def test_padding_colour_standardises_to_about_zero():
    padded = steps.standardize(transforms.pixels(Image.new("RGB", (1, 1), crops.FILL)))
    assert np.abs(padded).max() < 0.01


def test_crop_entirely_outside_the_image_is_all_fill():
    out = np.asarray(crops.crop_square(Image.new("RGB", (50, 50), (255, 255, 255)), 60, 0, 20, 16))
    assert (out == crops.FILL).all()


def test_two_handed_gesture_uses_the_united_box():
    united = (0.1, 0.2, 0.7, 0.4)
    record = _record(["hand_heart", "hand_heart"], united=united)
    assert crops.gesture_box(record) == united


def test_two_handed_gesture_without_united_box_uses_the_union_of_its_hands():
    boxes = [(0.1, 0.2, 0.2, 0.2), (0.4, 0.1, 0.1, 0.5), (0.8, 0.8, 0.1, 0.1)]
    record = _record(["timeout", "timeout", "no_gesture"], boxes=boxes)
    assert crops.gesture_box(record) == pytest.approx((0.1, 0.1, 0.4, 0.5))


def test_one_handed_gesture_uses_its_own_box_not_the_free_hand():
    boxes = [(0.1, 0.1, 0.1, 0.1), (0.6, 0.5, 0.2, 0.3)]
    record = _record(["no_gesture", "like"], boxes=boxes, folder="like")
    assert crops.gesture_box(record) == (0.6, 0.5, 0.2, 0.3)


def test_pick_crop_target_follows_the_no_gesture_probability():
    record = _record(["like", "no_gesture"], boxes=[(0.6, 0.5, 0.2, 0.3), (0.1, 0.1, 0.1, 0.1)])
    rng = np.random.default_rng(0)

    never = {crops.pick_crop_target(record, rng, 0.0) for _ in range(50)}
    always = {crops.pick_crop_target(record, rng, 1.0) for _ in range(50)}
    mixed = collections.Counter(crops.pick_crop_target(record, rng, 0.3)[1] for _ in range(1000))

    assert never == {((0.6, 0.5, 0.2, 0.3), "like")}
    assert always == {((0.1, 0.1, 0.1, 0.1), "no_gesture")}
    assert 230 < mixed["no_gesture"] < 370


def test_pick_crop_target_without_free_hand_or_gesture():
    rng = np.random.default_rng(0)
    assert crops.pick_crop_target(_record(["call"]), rng, 1.0)[1] == "call"
    only_free_hand = _record(["no_gesture"], folder="call")
    assert crops.pick_crop_target(only_free_hand, rng, 0.0)[1] == "no_gesture"


@pytest.mark.parametrize("size", [(192, 108), (108, 192)])
def test_letterbox_keeps_the_aspect_and_centres_the_padding(size):
    img = Image.new("RGB", size, (200, 10, 10))

    out = np.asarray(crops.letterbox(img, 64))

    content = (out == (200, 10, 10)).all(-1)
    rows, cols = np.nonzero(content)
    extent = (cols.max() - cols.min() + 1, rows.max() - rows.min() + 1)
    assert out.shape == (64, 64, 3) and max(extent) == 64 and min(extent) == 36
    assert (out[~content] == crops.FILL).all()
    short_axis = rows if size[0] > size[1] else cols
    assert short_axis.min() == 63 - short_axis.max() == 14  # (64 - 36) / 2 on each side


# ---- User-disjoint splits ----


def _population(num_users=40, classes=("call", "like", "palm", "fist"), seed=0):
    """Users with 3..30 images each over a few classes, like HaGRID's uneven contributions."""
    rng = np.random.default_rng(seed)
    records = []
    for u in range(num_users):
        for c in classes:
            for i in range(int(rng.integers(1, 8))):
                records.append(_record([c], user=f"user{u:02d}", image_id=f"{u}-{c}-{i}"))
    return records


def test_split_by_user_is_user_disjoint_and_near_70_30():
    records = _population()

    parts = splits.split_by_user(
        records, {"pretrain": 0.7, "finetune": 0.3}, seed=1, stratify_by=record_filters.gesture_name
    )

    splits.assert_user_disjoint(parts)
    assert sum(map(len, parts.values())) == len(records)
    assert len(parts["pretrain"]) / len(records) == pytest.approx(0.7, abs=0.03)
    for cls in ("call", "like", "palm", "fist"):
        per_side = [sum(r.class_folder == cls for r in parts[s]) for s in ("pretrain", "finetune")]
        assert per_side[0] / sum(per_side) == pytest.approx(0.7, abs=0.06)


def test_split_by_user_three_ways():
    records = _population(seed=3)

    parts = splits.split_by_user(records, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)

    splits.assert_user_disjoint(parts)
    fractions = [len(parts[s]) / len(records) for s in ("train", "val", "test")]
    assert fractions == pytest.approx([0.8, 0.1, 0.1], abs=0.03)


def test_split_by_user_depends_only_on_the_seed():
    records = _population()
    fractions = {"a": 0.7, "b": 0.3}

    first = splits.split_by_user(records, fractions, seed=5)
    again = splits.split_by_user(list(reversed(records)), fractions, seed=5)
    other = splits.split_by_user(records, fractions, seed=6)

    b_users = {r.user_id for r in first["b"]}
    assert b_users == {r.user_id for r in again["b"]} != {r.user_id for r in other["b"]}
    assert first["a"] == [r for r in records if r.user_id not in b_users]  # input order kept


def test_split_by_user_rejects_fractions_not_summing_to_one():
    with pytest.raises(ValueError, match="sum to 1"):
        splits.split_by_user(_population(4), {"a": 0.7, "b": 0.2}, seed=0)


def test_assert_user_disjoint_names_the_shared_user():
    parts = {"train": [_record(["call"], user="alice")], "val": [_record(["like"], user="alice")]}
    with pytest.raises(splits.UserOverlapError, match="'alice' is in both 'train' and 'val'"):
        splits.assert_user_disjoint(parts)


def test_a_read_v1_tree_splits_by_user(tmp_path):
    _v1(tmp_path, num_users=40, images_per_user=1, splits=("ann_train_val",))
    records, _ = hagrid.read_hagrid_v1(tmp_path)

    parts = splits.split_by_user(
        records, {"pretrain": 0.7, "finetune": 0.3}, seed=0, stratify_by=record_filters.gesture_name
    )

    splits.assert_user_disjoint(parts)
    assert len({r.user_id for r in parts["pretrain"]}) == 28
