"""No quiet data loss: `config.data.classes` ('hagrid' | 'present' | a list), images dropped counted per
reason and class, and a run that would drop more than `config.data.max_dropped_fraction` refused."""

import os
import subprocess
import sys

from absl import flags
import hagrid_fixtures as fx
import pytest

from gmae_jax import config_lib, schema
from gmae_jax.data import hagrid, hagrid_layout, prepare, read_report, sources
from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.stages import finetune

flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
# A HaGRID v2 tree of custom gestures: 'wave' and 'point_left' are not HaGRID's names, the rest are.
CUSTOM = ("wave", "point_left", "call", "like", "no_gesture")
PRESENT = ["call", "like", "point_left", "wave", "no_gesture"]  # sorted, no_gesture last


@pytest.fixture(scope="module")
def custom_root(tmp_path_factory):
    """3 users (one per split) x 2 images x 5 classes: 10 images per split."""
    root = tmp_path_factory.mktemp("custom")
    fx.make_tree(root, "v2", classes=CUSTOM, num_users=3, images_per_user=2)
    return root


def _data(root, **overrides):
    return schema.DataConfig(root=str(root), **overrides)


def test_present_reads_every_image_of_a_custom_tree(custom_root):
    names, train, val = sources.open_sources(_data(custom_root, classes="present"))

    assert names == PRESENT
    assert len(train) == len(val) == 10
    assert {r.class_folder for r in train.records} == set(CUSTOM)


def test_default_refuses_a_custom_tree_with_the_images_lost_per_reason_and_class(custom_root):
    # train + val keep 12 HaGRID-named images; the two unknown folders hold 6 images each, 4 in train + val.
    with pytest.raises(DataLayoutError) as error:
        sources.open_sources(_data(custom_root))

    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"8 of 20 images (40.0%) of {custom_root} would be dropped")
    assert "unknown_class 8 (" in message and "point_left 4" in message and "wave 4" in message
    assert "--config.data.classes=present" in message


def test_an_explicit_list_orders_the_labels_and_counts_the_rest(custom_root):
    names, train, _ = sources.open_sources(
        _data(custom_root, classes="wave,call,like,no_gesture", max_dropped_fraction=0.5))

    assert names == ["wave", "call", "like", "no_gesture"]
    assert {r.class_folder for r in train.records} == {"wave", "call", "like", "no_gesture"}
    _, report = hagrid.read_hagrid_v2(custom_root, class_names=names)
    assert {r: dict(c) for r, c in report.dropped_images().items()} == {read_report.UNKNOWN_CLASS: {"point_left": 6}}


def test_each_image_dropped_is_counted_once_under_its_reason_and_class(tmp_path):
    tree = fx.make_tree(tmp_path, "v2", classes=("call", "like"), num_users=1, images_per_user=2)
    fx.inject_unknown_class_folder(tree, "waving")
    fx.inject_unannotated_image(tree, "like")
    fx.inject_missing_image(tree, "train", "call")
    fx.inject_boxes(tree, "train", "like", "no-box", [], [])

    records, report = hagrid.read_hagrid_v2(tmp_path)

    assert len(records) == 4
    assert {r: dict(c) for r, c in report.dropped_images().items()} == {
        read_report.UNKNOWN_CLASS: {"waving": 1}, read_report.UNANNOTATED: {"like": 1},
        read_report.MISSING_IMAGE: {"call": 1}, read_report.EMPTY_BBOXES: {"like": 1}}
    assert "unannotated 1 (like 1)" in report.describe_dropped()


def test_annotations_of_gestures_not_downloaded_lose_no_image(tmp_path):
    """HaGRID ships every gesture's JSON in one archive and the images per gesture."""
    tree = fx.make_tree(tmp_path, "v2", classes=("call", "like"), num_users=3, images_per_user=1)
    tree.add("train", "palm", "p1", fx.entry(["palm"]), image=False)  # palm.json, no palm folder

    names, train, _ = sources.open_sources(_data(tmp_path))

    assert names == list(hagrid_layout.HAGRID_V2_CLASSES) and len(train) == 2
    _, report = hagrid.read_hagrid_v2(tmp_path)
    assert report.skipped == {read_report.NO_IMAGE_FOLDER: [str(tree.json_path("train", "palm"))]}
    assert report.dropped_images() == {}


def test_a_class_list_with_a_repeated_name_is_one_line(custom_root):
    with pytest.raises(DataLayoutError, match=r"config.data.classes='call,call' must be 'hagrid', 'present' or"):
        sources.open_sources(_data(custom_root, classes="call,call"))


def _finetune_config(root, **overrides):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.data.root = str(root)
    config.data.update(overrides)
    return config


def test_finetune_num_classes_follows_the_present_classes(custom_root):
    config = _finetune_config(custom_root, classes="present")
    config.num_classes = 5
    assert finetune.open_data(config).class_names == PRESENT

    config.num_classes = 34
    with pytest.raises(config_lib.ConfigError, match="config.num_classes=34 but the data in .* has 5 classes"
                       r" \(call, like, point_left, wave, no_gesture\); set --config.num_classes=5"):
        finetune.open_data(config)


def test_finetune_num_classes_must_match_an_explicit_list(custom_root):
    config = _finetune_config(custom_root, classes="wave,call,like")
    with pytest.raises(config_lib.ConfigError,
                       match="config.num_classes=18 but config.data.classes names 3; set --config.num_classes=3"):
        finetune.validate(config)


def _prepare_config(root, **data):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "prepare")
    config.data.root = str(root)
    config.data.update(data)
    config.update(dict(image_side=32, records_per_shard=16, num_workers=1))
    # The tree's 3 people fill one corpus's two splits (prepare refuses a split left without people).
    config.corpora, config.splits = {"all": 1.0}, {"train": 0.6, "val": 0.4}
    config.include_official_test = True  # the third person is in the test split
    return config


def test_prepare_keeps_the_present_classes_and_refuses_the_default(custom_root, tmp_path):
    with pytest.raises(DataLayoutError, match=r"12 of 30 images .* unknown_class 12 \("):
        prepare.prepare(_prepare_config(custom_root), str(tmp_path / "refused"))  # every split: 18 kept + 12
    assert not (tmp_path / "refused").exists()  # refused before decoding or writing anything

    manifest = prepare.prepare(_prepare_config(custom_root, classes="present"), str(tmp_path / "kept"))

    assert manifest["class_names"] == PRESENT
    assert sum(sum(counts.values()) for counts in manifest["counts"].values()) == 30
    assert manifest["dropped_images"] == {}


@pytest.mark.slow
def test_the_entry_point_refuses_a_custom_tree_in_one_line(custom_root, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/finetune.py:runlocal",
         f"--workdir={tmp_path / 'run'}", f"--config.data.root={custom_root}"],
        cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip

    assert result.returncode == 1
    assert "Traceback" not in result.stderr + result.stdout
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 8 of 20 images (40.0%)") and "--config.data.classes=present" in last
    assert not (tmp_path / "run" / "config.json").exists()


def test_hand_crops_of_free_hands_need_no_gesture_among_the_classes(custom_root):
    with pytest.raises(DataLayoutError, match="config.data.no_gesture_prob=0.3 crops free hands as 'no_gesture', "
                       r"which is not among the classes \['wave', 'call'\]"):
        sources.open_sources(_data(custom_root, classes="wave,call", mode="hand_crop", no_gesture_prob=0.3))


def test_a_run_evaluated_on_a_tree_with_other_gestures_scores_its_own(custom_root, caplog):
    """A run of 2 gestures evaluated on a HaGRID tree of 5 stopped with advice for flags that the
    evaluate stage does not have (data.classes, data.max_dropped_fraction)."""
    val = sources.open_split(_data(custom_root), "val", ["call", "like"])
    assert len(val) == 4 and {r.class_folder for r in val.records} == {"call", "like"}
    assert f"{custom_root}: 6 images of gestures the run was not trained on are left out (unknown_class:" \
        in caplog.text
