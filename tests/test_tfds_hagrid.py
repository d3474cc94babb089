"""The TFDS builder builds HaGRID into ArrayRecord files without TensorFlow, and its data source
feeds the same grain pipeline."""

import itertools

from absl import flags
import hagrid_fixtures as fx
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from gmae_jax import schema
from gmae_jax.data import hagrid_layout, pipeline, record_filters, splits  # noqa: E402
from gmae_jax.data import tfds_hagrid  # noqa: E402

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
    source = tfds_hagrid.tfds_source(data_dir, "train", mode="hand_crop")

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
