"""Specification of the data sources: raw HaGRID v1 / v2 through the grain pipeline.

Labels are positions in the fixed HaGRID class lists, so a batch's labels say which classes it
holds; user ids are in the file names (`<class>-<user>-<i>.jpg`).
"""

import itertools
import logging
import json
import os
import re
import shutil
import subprocess
import sys

from absl import flags
import hagrid_fixtures as fx
import numpy as np
import pytest

from gmae_jax import schema
from gmae_jax.data import crops, hagrid_layout, pipeline, record_filters, sources, splits
from gmae_jax.data.class_folders import DataLayoutError

flags.FLAGS.mark_as_parsed()

SIZE = 16
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V2 = hagrid_layout.HAGRID_V2_CLASSES


def data_config(root, **overrides):
    return schema.DataConfig(root=str(root), **overrides)


@pytest.fixture(scope="module")
def v2_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("v2")
    fx.make_tree(root, "v2", num_users=6, images_per_user=2)  # 2 users per split, 16 images each
    return root


def _train(source, num_workers=0, batch=4, **kwargs):
    return pipeline.make_train_dataset(
        source, image_size=SIZE, global_batch_size=batch, seed=0,
        aug=schema.AugmentConfig(), num_workers=num_workers, **kwargs)  # fmt: skip


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_v2_splits_come_from_the_annotation_folders_and_labels_from_the_class_list(v2_root):
    names, train, val = sources.open_sources(data_config(v2_root))

    assert names == list(V2)
    assert {r.user_id for r in train.records} == {"user000", "user003"}
    assert {r.user_id for r in val.records} == {"user001", "user004"}
    assert {r.class_folder for r in train.records} == {"call", "like", "hand_heart", "no_gesture"}


def test_v2_batch_labels_name_the_folders_the_images_came_from(v2_root):
    _, train, _ = sources.open_sources(data_config(v2_root))

    batches = _take(iter(_train(train, batch=16)), 1)

    assert sorted(batches[0]["label"]) == sorted(
        V2.index(r.class_folder) for r in train.records)  # one epoch of 16


def test_v1_train_val_is_a_user_split_of_train_val_and_test_is_ann_test(tmp_path):
    fx.make_tree(tmp_path, "v1", classes=("call", "like"), num_users=20, images_per_user=1,
                 splits=("ann_train_val",) * 4 + ("ann_test",))  # users 4, 9, 14, 19 are test
    config = data_config(tmp_path, eval_split="test")
    _, train, test = sources.open_sources(config)
    _, _, val = sources.open_sources(data_config(tmp_path))

    splits.assert_user_disjoint({"train": train.records, "val": val.records, "test": test.records})
    assert {r.user_id for r in test.records} == {"user004", "user009", "user014", "user019"}
    assert len({r.user_id for r in train.records} | {r.user_id for r in val.records}) == 16
    assert len({r.user_id for r in val.records}) in (3, 4)  # 20 % of 16 users


def test_a_v1_tree_of_the_subsample_alone_trains_on_it(tmp_path):
    fx.make_tree(tmp_path, "v1", classes=("call", "like"), num_users=10, images_per_user=1,
                 splits=("ann_subsample",))
    _, train, val = sources.open_sources(data_config(tmp_path))
    assert len(train.records) + len(val.records) == 20
    splits.assert_user_disjoint({"train": train.records, "val": val.records})


def test_a_v1_subsample_beside_every_annotation_archive_trains_on_the_subsample(tmp_path, caplog):
    """All annotation archives with the subsample's images: ann_train_val found most of its images
    missing and stopped the run, with no setting to read ann_subsample instead (session 38's audit)."""
    tree = fx.make_tree(tmp_path, "v1", classes=("call", "like"), num_users=10, images_per_user=1,
                        splits=("ann_subsample",))
    for cls in ("call", "like"):  # the full set annotates these images and 30 more of each class
        full = dict(tree.annotations[("ann_subsample", cls)])
        full.update({f"{cls}-other-{i}": fx.entry([cls], user_id=f"user{100 + i:03d}", version="v1")
                     for i in range(30)})
        tree.annotations[("ann_train_val", cls)] = full
        tree.write_json("ann_train_val", cls)
    with caplog.at_level(logging.WARNING):
        _, train, val = sources.open_sources(data_config(tmp_path))
    assert len(train.records) + len(val.records) == 20
    assert "holds HaGRID's subsample" in caplog.text
    # With the full set's images on disk, ann_train_val it is.
    for cls in ("call", "like"):
        for i in range(30):
            fx.write_image(tmp_path / cls / f"{cls}-other-{i}.jpg")
    _, train, val = sources.open_sources(data_config(tmp_path))
    assert len(train.records) + len(val.records) == 80


def test_forced_layout_that_does_not_match_names_the_folder(v2_root):
    with pytest.raises(DataLayoutError, match=str(v2_root)):
        sources.open_sources(data_config(v2_root, layout="hagrid_v1"))


@pytest.mark.parametrize("inside", ["hagrid_dataset", "hagrid_annotations"])
def test_a_root_inside_a_v2_tree_points_at_the_tree(v2_root, inside):
    with pytest.raises(DataLayoutError, match=rf"^{v2_root / inside} is a part of the HaGRID v2 tree in {v2_root}; "
                       rf"point the root at {v2_root}\.$"):
        sources.open_sources(data_config(v2_root / inside))


def test_a_class_folder_of_a_v2_tree_as_root_points_at_the_tree(v2_root):
    with pytest.raises(DataLayoutError, match=rf"Did you mean --config.data.root={v2_root}\?$"):
        sources.open_sources(data_config(v2_root / "hagrid_dataset" / "call"))


def test_a_root_one_level_off_gets_a_did_you_mean(tmp_path):
    v1 = tmp_path / "v1"
    fx.make_tree(v1, "v1", classes=("call", "like"), num_users=2, images_per_user=1)
    with pytest.raises(DataLayoutError, match=rf"Did you mean --config.data.root={v1}\?"):
        sources.open_sources(data_config(v1 / "ann_train_val"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataLayoutError, match=r"Cannot tell the layout .*index.json\)\.$"):
        sources.open_sources(data_config(tmp_path / "nothing"))


def test_a_prepare_workdir_as_root_names_each_of_its_corpora(tmp_path):
    for corpus in ("finetune", "pretrain"):
        (tmp_path / corpus).mkdir()
        (tmp_path / corpus / sources.INDEX_FILE).write_text("{}")
    (tmp_path / "class_folders").mkdir()

    with pytest.raises(DataLayoutError, match=r"Or shards of the prepare stage .* Did you mean "
                       rf"--config.data.root={tmp_path / 'finetune'} or {tmp_path / 'pretrain'}\?$"):
        sources.open_sources(data_config(tmp_path))


@pytest.mark.parametrize("missing, field", [("train", "train_split"), ("val", "eval_split")])
def test_a_missing_v2_split_folder_names_the_flag_that_asked_for_it(tmp_path, missing, field):
    fx.make_tree(tmp_path, "v2", classes=("call", "like"), num_users=3, images_per_user=1)
    for path in (tmp_path / "hagrid_annotations" / missing).iterdir():
        path.unlink()
    (tmp_path / "hagrid_annotations" / missing).rmdir()
    found = sorted({"train", "val", "test"} - {missing})

    with pytest.raises(DataLayoutError, match=rf"has no {missing}/ annotation folder; add it, or set "
                       rf"--config.data.{field} .*to one of {re.escape(str(found))}\.$"):
        sources.open_sources(data_config(tmp_path))


def test_hand_crop_needs_hagrid_boxes(tmp_path):
    fx.write_image(tmp_path / "train" / "palm" / "a.jpg")
    fx.write_image(tmp_path / "val" / "palm" / "b.jpg")

    with pytest.raises(DataLayoutError, match="hand_crop needs a HaGRID layout"):
        sources.open_sources(data_config(tmp_path, mode="hand_crop"))


def test_gesture_folder_image_with_only_no_gesture_is_dropped_not_guessed(tmp_path):
    tree = fx.make_tree(tmp_path, "v2", num_users=3, images_per_user=1)
    fx.inject_boxes(tree, "train", "like", "unlabelled", [[0.1, 0.1, 0.2, 0.2]], ["no_gesture"])

    _, train, _ = sources.open_sources(data_config(tmp_path, max_dropped_fraction=0.2))  # 1 of 9

    assert "unlabelled" not in {r.image_id for r in train.records}
    assert len(train) == 4


def test_full_frame_eval_is_letterboxed(v2_root):
    _, _, val = sources.open_sources(data_config(v2_root))
    wide = next(i for i, r in enumerate(val.records) if r.image_id.endswith("004-0"))  # 192x108

    batch = next(iter(pipeline.make_eval_dataset(
        sources.Source(val.records[wide : wide + 1], val.view), image_size=SIZE,
        global_batch_size=1, num_workers=0)))  # fmt: skip

    image = batch["image"][0]
    assert (image[0] == crops.FILL).all()  # top pad
    assert not (image[SIZE // 2] == crops.FILL).all()  # the frame in the middle


def test_hand_crop_labels_follow_the_no_gesture_probability(v2_root):
    config = data_config(v2_root, mode="hand_crop", no_gesture_prob=1.0)
    _, train, _ = sources.open_sources(config)
    with_free_hand = [r for r in train.records if "no_gesture" in r.labels]

    labels = next(iter(_train(sources.Source(with_free_hand, train.view), batch=len(with_free_hand))))

    assert set(labels["label"]) == {V2.index("no_gesture")}


def test_hand_crop_eval_labels_are_the_gestures(v2_root):
    _, _, val = sources.open_sources(data_config(v2_root, mode="hand_crop", no_gesture_prob=1.0))

    batches = list(pipeline.make_eval_dataset(val, image_size=SIZE, global_batch_size=4,
                                              num_workers=0))

    labels = np.concatenate([b["label"] for b in batches])
    assert sorted(labels) == sorted(V2.index(record_filters.gesture_name(r)) for r in val.records)


@pytest.mark.parametrize("mode", ["full_frame", "hand_crop"])
def test_raw_hagrid_batches_identical_for_0_and_2_workers(v2_root, mode):
    _, train, _ = sources.open_sources(data_config(v2_root, mode=mode))

    _assert_same(_take(iter(_train(train, 0)), 5), _take(iter(_train(train, 2)), 5))


def test_raw_hagrid_resumes_exactly_mid_epoch(v2_root):
    _, train, _ = sources.open_sources(data_config(v2_root, mode="hand_crop"))
    iterator = iter(_train(train))
    _take(iterator, 3)  # inside the first epoch of 4 batches
    state = iterator.get_state()
    expected = _take(iterator, 3)

    resumed = iter(_train(train))
    resumed.set_state(state)

    _assert_same(_take(resumed, 3), expected)


def test_two_processes_see_disjoint_slices_covering_an_epoch(v2_root):
    _, train, _ = sources.open_sources(data_config(v2_root))

    def views(batches):  # an example's view: its corner pixels and its colour jitter (drawn per example)
        return [(tuple(img[:2, :2].ravel()), tuple(jitter)) for b in batches
                for img, jitter in zip(b["image"], b["color_jitter"])]

    seen = [views(_take(iter(_train(train, batch=4, process_index=index, process_count=2)), 4)) for index in range(2)]

    everything = views(_take(iter(_train(train, batch=4)), 4))
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(everything)


def _with_bad_image(root):
    tree = fx.make_tree(root, "v2", classes=("call", "like"), num_users=3, images_per_user=2)
    return fx.inject_truncated_jpeg(tree, "train", "call")


def test_unreadable_image_in_training_is_logged_and_replaced_by_the_next(tmp_path, caplog):
    bad = _with_bad_image(tmp_path)
    _, train, _ = sources.open_sources(data_config(tmp_path))

    batch = next(iter(_train(train, batch=len(train))))

    assert batch["image"].shape[0] == len(train) == 5
    assert f"Unreadable image replaced by the next one (1 so far, config.data.max_bad_images=100): Cannot decode " \
           f"image {bad}: " in caplog.text
    assert caplog.text.count(str(bad)) == 1  # named once, not once per layer that passed the error on
    bad_index = next(i for i, r in enumerate(train.records) if r.path == str(bad))
    replacement = train.records[(bad_index + 1) % len(train)]
    counts = np.bincount(batch["label"], minlength=len(V2))
    assert counts[V2.index(replacement.class_folder)] == 1 + sum(
        r.class_folder == replacement.class_folder for r in train.records if r.path != str(bad))


def test_unreadable_images_beyond_the_budget_stop_training_naming_the_file(tmp_path):
    bad = _with_bad_image(tmp_path)
    _, train, _ = sources.open_sources(data_config(tmp_path, max_bad_images=0))

    with pytest.raises(pipeline.BadImageBudgetError, match=f"max_bad_images=0.*{bad.name}"):
        next(iter(_train(train, batch=len(train))))


def test_unreadable_image_in_evaluation_is_left_out(tmp_path, caplog):
    tree = fx.make_tree(tmp_path, "v2", classes=("call", "like"), num_users=3, images_per_user=2)
    bad = fx.inject_truncated_jpeg(tree, "val", "like")
    _, _, val = sources.open_sources(data_config(tmp_path))

    batches = list(pipeline.make_eval_dataset(val, image_size=SIZE, global_batch_size=8,
                                              num_workers=0))

    assert np.concatenate([b["valid"] for b in batches]).sum() == len(val) - 1 == 4
    assert (f"Unreadable image left out of the evaluation (1 so far, config.data.max_bad_images=100): Cannot "
            f"decode image {bad}: ") in caplog.text


@pytest.mark.slow
def test_pretraining_from_raw_hagrid_through_the_entry_point(v2_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/pretrain.py:runlocal",
         f"--workdir={tmp_path}", f"--config.data.root={v2_root}", "--config.total_steps=2",
         "--config.model.img_size=32", "--config.model.depth=1"],
        cwd=REPO, capture_output=True, text=True, timeout=600)  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    assert "(hagrid_v2, full_frame): 34 classes, 16 train / 16 val" in result.stderr
    assert "[pretrain] step 2/2" in result.stderr
    assert json.loads((tmp_path / "classes.json").read_text()) == list(V2)


def test_a_person_in_two_splits_of_a_v2_tree_is_warned_of(tmp_path, caplog):
    tree = fx.make_tree(tmp_path, "v2", classes=("call", "like"), num_users=2, images_per_user=1,
                        splits=("train", "val"))
    sources.open_sources(data_config(tmp_path))
    assert "share people" not in caplog.text
    tree.add("val", "call", "again", fx.entry(["call"], user_id="user000"))  # user000 trains
    sources.open_sources(data_config(tmp_path))
    assert ("User 'user000' is in both 'train' and 'val': a person seen in training must not be evaluated on. "
            f"{tmp_path}'s splits share people") in caplog.text


@pytest.mark.parametrize("version, images", [("v2", "hagrid_dataset"), ("v1", "")])
def test_class_folders_one_level_too_deep_are_found_and_named(tmp_path, version, images):
    """An archive extracted into a folder of its own name: hagrid_dataset/hagrid_dataset/<class>/."""
    root = tmp_path / version
    fx.make_tree(root, version, classes=("call", "like"), num_users=6, images_per_user=1)
    images_root = root / images
    deeper = images_root / "extracted"
    deeper.mkdir()
    for folder in ("call", "like"):
        (images_root / folder).rename(deeper / folder)
    with pytest.raises(DataLayoutError, match=rf"holds no usable images\. Its class folders are one level deeper, "
                       rf"in {deeper} \(.*\): move them up into {images_root}\.$"):
        sources.open_sources(data_config(root))
    for folder in ("call", "like"):
        (deeper / folder).rename(images_root / folder)
    shutil.rmtree(deeper)
    assert len(sources.open_sources(data_config(root)).train) > 0


@pytest.mark.parametrize("field, value, message", [
    ("layout", "hagridv2", r"^config.data.layout='hagridv2' must be one of \('auto', 'class_folders'"),
    ("mode", "crop", r"^config.data.mode='crop' must be one of \('full_frame', 'hand_crop'\)$"),
])
def test_an_unknown_layout_or_mode_is_named_alone(tmp_path, field, value, message):
    data = schema.DataConfig(root=str(tmp_path), **{field: value})
    with pytest.raises(DataLayoutError, match=message):
        sources.open_sources(data)
