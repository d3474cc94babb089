"""The TFDS builder builds HaGRID into ArrayRecord files without TensorFlow, and its data source
feeds the same grain pipeline."""

import itertools
import json
import os
import shutil

from absl import flags
import hagrid_fixtures as fx
import numpy as np
import pytest
import tensorflow_datasets as tfds  # the dev extra installs it: a missing one fails here, never skips

from gmae_jax import config_lib, schema, stages  # noqa: E402
from gmae_jax.data import hagrid_layout, pipeline, prepare, record_filters, sources, splits, subsets  # noqa: E402
from gmae_jax.data import tfds_hagrid  # noqa: E402
from gmae_jax.data.class_folders import DataLayoutError  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")

flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hagrid")
    fx.make_tree(root, "v2", num_users=6, images_per_user=2)
    data_dir = tmp_path_factory.mktemp("tfds")
    builder = tfds_hagrid.HagridGmae(data_dir=str(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    return builder, str(data_dir)


def test_build_without_tensorflow_keeps_hagrid_splits(built):
    builder, data_dir = built

    with pytest.raises(ImportError):
        import tensorflow  # noqa: F401
    assert builder.info.file_format.value == "array_record"
    assert {s: builder.info.splits[s].num_examples for s in ("train", "val", "test")} == dict(
        train=16, val=16, test=16)
    parts = {s: [tfds_hagrid.TfdsReader(data_dir, s)[i][0] for i in range(16)] for s in ("train", "val")}
    splits.assert_user_disjoint(parts)
    assert {r.user_id for r in parts["val"]} == {"user001", "user004"}


def test_data_source_feeds_the_grain_pipeline_identically_for_0_and_2_workers(built):
    _, data_dir = built
    source = sources.open_sources(schema.DataConfig(root=data_dir, mode="hand_crop")).train

    def batches(workers):
        ds = pipeline.make_train_dataset(source, image_size=16, global_batch_size=16, seed=0,
                                         aug=schema.AugmentConfig(), num_workers=workers)
        return list(itertools.islice(iter(ds), 2))

    zero, two = batches(0), batches(2)
    for a, b in zip(zero, two, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    names = [record_filters.gesture_name(source[i][0]) for i in range(16)]
    expected = sorted(map(hagrid_layout.HAGRID_V2_CLASSES.index, names))
    assert sorted(zero[0]["label"]) == expected


def test_a_build_is_a_layout_whose_classes_come_from_its_metadata(built, monkeypatch):
    """config.data.root=<data_dir> reads a build (detected, or layout=tfds); the classes and the
    fine-tune's check for classes without images come from the build's counts, not from its images."""
    _, data_dir = built
    present = ["call", "hand_heart", "like", "no_gesture"]
    splits_ = sources.open_sources(schema.DataConfig(root=data_dir, classes="present"))
    assert splits_.class_names == present
    assert splits_.train.decoded_once and not splits_.train.prepared
    assert len(splits_.train) == len(splits_.eval) == 16
    labels = subsets.labels_of(splits_.eval)
    assert sorted(np.bincount(labels).tolist()) == [4, 4, 4, 4]
    official = sources.open_sources(schema.DataConfig(root=data_dir, layout="tfds")).train
    assert official.view.class_names == hagrid_layout.HAGRID_V2_CLASSES

    def unread(self, index):
        raise AssertionError("an image was read to count classes")

    monkeypatch.setattr(tfds_hagrid.TfdsReader, "__getitem__", unread)
    assert subsets.classes_without_images(splits_.train, present) == []
    empty = subsets.classes_without_images(official, hagrid_layout.HAGRID_V2_CLASSES)
    assert sorted(empty) == sorted(set(hagrid_layout.HAGRID_V2_CLASSES) - set(present))


PART_OF_A_BUILD = r"is a part of the TFDS build in .*; point the root at its data_dir: --config.data.root="


@pytest.mark.parametrize("where, data, message", [
    ("hagrid_gmae", {}, PART_OF_A_BUILD),
    ("hagrid_gmae/1.1.0", {}, PART_OF_A_BUILD),
    ("", {"classes": "call,like"}, r"Split 'train' of the TFDS build in .* holds 8 images of hand_heart, "
                                   r"no_gesture, which are not among the classes \['call', 'like'\]; a build is "
                                   r"read whole"),
    ("", {"eval_split": "holdout"}, r"has no split 'holdout'; set --config.data.eval_split .* to one of "
                                    r"\['test', 'train', 'val'\]"),
    ("", {"mode": "hand_crop", "no_gesture_prob": 0.5, "classes": "call,hand_heart,like"},
     r"not among the classes"),
])
def test_a_build_read_wrongly_is_one_line_saying_what_to_do(built, where, data, message):
    _, data_dir = built
    root = os.path.join(data_dir, where) if where else data_dir
    with pytest.raises(DataLayoutError, match=message):
        sources.open_sources(schema.DataConfig(root=root, **data))


def test_a_build_of_another_version_or_without_counts_says_to_build_it_again(built, tmp_path):
    _, data_dir = built
    old = tmp_path / "old"
    shutil.copytree(os.path.join(data_dir, "hagrid_gmae", str(tfds_hagrid.HagridGmae.VERSION)),
                    old / "hagrid_gmae" / "1.0.0")
    with pytest.raises(DataLayoutError, match=r"holds versions \['1.0.0'\] of hagrid_gmae, not 1.1.0 .*; build it "
                                              r"with `tfds build gmae_jax/data/tfds_hagrid.py"):
        sources.open_sources(schema.DataConfig(root=str(old)))
    uncounted = tmp_path / "uncounted"
    shutil.copytree(os.path.join(data_dir, "hagrid_gmae"), uncounted / "hagrid_gmae")
    (uncounted / "hagrid_gmae" / str(tfds_hagrid.HagridGmae.VERSION) / "metadata.json").write_text("{}")
    with pytest.raises(DataLayoutError, match="has no class counts in its metadata.json; delete it and build it"):
        sources.open_sources(schema.DataConfig(root=str(uncounted)))


def test_the_prepare_stage_refuses_a_build_it_need_not_prepare(built):
    _, data_dir = built
    with pytest.raises(DataLayoutError, match="holds a TFDS build of HaGRID, split by person and resized already: "
                                              "train on it as it is"):
        prepare._read(data_dir, "auto", "hagrid")


@pytest.mark.slow
def test_a_finetune_trains_and_evaluates_on_a_build(built, tmp_path):
    _, data_dir = built
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.update(num_classes=4, batch_size=8, total_steps=2, eval_every=2, checkpoint_every=2)
    config.model.depth = 1  # one block of each kind: the build is the point, not the model
    config.optim.warmup_steps = 1
    config.data.update(root=data_dir, classes="present", mode="hand_crop", num_workers=0)
    metrics = stages.run(config, str(tmp_path))
    assert json.loads((tmp_path / "classes.json").read_text()) == ["call", "hand_heart", "like", "no_gesture"]
    assert [metrics[f"support/{name}"] for name in ("call", "hand_heart", "like", "no_gesture")] == [4, 4, 4, 4]
    assert os.listdir(tmp_path / "checkpoints") == ["2"]


def test_a_v1_subsample_builds_with_the_user_split_training_makes(tmp_path):
    """The builder read ann_train_val alone, and re-split it 80 / 20 with seed 0 of its own, while
    training reads ann_subsample where only that was downloaded and splits per config.data."""
    from gmae_jax.data import sources

    root = tmp_path / "hagrid"
    fx.make_tree(root, "v1", classes=("call", "like"), num_users=10, images_per_user=1, splits=("ann_subsample",))
    builder = tfds_hagrid.HagridGmae(data_dir=str(tmp_path / "tfds"))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(root)))
    built = {s: {r.user_id for r in (tfds_hagrid.TfdsReader(str(tmp_path / "tfds"), s)[i][0]
                                     for i in range(builder.info.splits[s].num_examples))} for s in ("train", "val")}
    data = schema.DataConfig()
    recs, _ = sources.hagrid.read_hagrid_v1(root, "ann_subsample")
    expected = sources.hagrid_splits(recs, "hagrid_v1", ("train", "val"), data)
    assert built == {s: {r.user_id for r in rs} for s, rs in expected.items()}
    assert built["val"] and built["train"]
    opened = sources.open_sources(schema.DataConfig(root=str(tmp_path / "tfds")))
    assert opened.class_names == list(hagrid_layout.HAGRID_V1_CLASSES)  # 'hagrid': the build's version's list
