"""Specification of the prepare stage and of training input read back from its ArrayRecord shards."""

import io
import itertools
import json
import os
import re
import shutil
import subprocess
import sys

from absl import flags
import hagrid_fixtures as fx
import numpy as np
from PIL import Image
import pytest

from gmae_jax import config_lib, host_resources, schema, stages, workdir_lock
from gmae_jax.stages import finetune as finetune_stage
from gmae_jax.data import (class_folders, crops, hagrid, hagrid_layout, pipeline, prepare, records, sources, splits,
                           worker_pool)

flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
CLASSES = ("call", "like", "hand_heart", "no_gesture")
NUM_USERS = 30
SIZE = 16


def prepare_config(root, **overrides):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "prepare")
    config.data.root = str(root)
    config.update(dict(image_side=48, crop_size=40, records_per_shard=8, num_workers=1))
    config.update(overrides)
    return config


def data_config(root, **overrides):
    return schema.DataConfig(root=str(root), **overrides)


def _tree(root):
    """NUM_USERS people x every class, one image each, all in the v2 train annotations."""
    return fx.make_tree(root, "v2", classes=CLASSES, num_users=NUM_USERS, images_per_user=1,
                        splits=("train",))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A v2 tree with a truncated JPEG, a duplicate and a missing image, prepared on 2 processes."""
    root = tmp_path_factory.mktemp("hagrid")
    tree = _tree(root)
    bad = fx.inject_truncated_jpeg(tree, "train", "like")
    original = tree.image_path("call", "call-000-0")
    copy = tree.add("train", "call", "zz-copy", fx.entry(["call"], user_id="user000"))
    copy.write_bytes(original.read_bytes())
    missing = fx.inject_missing_image(tree, "train", "like")
    out = tmp_path_factory.mktemp("prepared")
    manifest = prepare.prepare(prepare_config(root, num_workers=2, class_folders=True), str(out))
    return out, manifest, {"bad": bad, "copy": copy, "missing": missing, "root": root}


def _read_back(out):
    """(corpus, split) -> records decoded from the shards."""
    result = {}
    for corpus in ("pretrain", "finetune"):
        index = json.loads((out / corpus / sources.INDEX_FILE).read_text())
        for split, entry in index["splits"].items():
            reader = records.ShardReader([out / corpus / s for s in entry["shards"]])
            result[(corpus, split)] = [reader[i][0] for i in range(len(reader))]
    return result


def test_prepared_corpora_are_user_disjoint_and_70_30(prepared):
    out, manifest, _ = prepared
    parts = _read_back(out)

    splits.assert_user_disjoint({f"{c}/{s}": rs for (c, s), rs in parts.items()})
    users = {c: {r.user_id for (cc, _), rs in parts.items() if cc == c for r in rs}
             for c in ("pretrain", "finetune")}
    assert len(users["pretrain"]) + len(users["finetune"]) == NUM_USERS
    assert len(users["pretrain"]) / NUM_USERS == pytest.approx(0.7, abs=0.05)
    for cls in CLASSES:  # stratified: each class near 70 / 30 too
        n = {c: sum(manifest["counts"][f"{c}/{s}"].get(cls, 0) for s in ("train", "val"))
             for c in ("pretrain", "finetune")}
        assert n["pretrain"] / (n["pretrain"] + n["finetune"]) == pytest.approx(0.7, abs=0.1)


def test_manifest_counts_match_the_shards_and_name_every_skip(prepared):
    out, manifest, injected = prepared
    parts = _read_back(out)

    assert manifest["class_names"] == list(hagrid_layout.HAGRID_V2_CLASSES)
    for (corpus, split), rs in parts.items():
        assert sum(manifest["counts"][f"{corpus}/{split}"].values()) == len(rs) > 0
    assert sum(len(rs) for rs in parts.values()) == NUM_USERS * len(CLASSES)
    assert str(injected["bad"]) in json.dumps(manifest["skipped"]["undecodable"])
    [duplicate] = manifest["skipped"]["duplicate"]  # 'path: what was wrong', for people
    assert duplicate.startswith(f"{injected['copy']}: same bytes as ")
    assert str(injected["missing"]) in json.dumps(manifest["skipped"]["missing_image"])


def test_stored_frames_have_the_shorter_side_and_the_original_boxes(prepared):
    out, _, injected = prepared
    index = json.loads((out / "finetune" / sources.INDEX_FILE).read_text())
    reader = records.ShardReader([out / "finetune" / s for s in index["splits"]["train"]["shards"]])

    record, jpeg = reader[0]
    raw = {r.path: r for r in hagrid.read_hagrid_v2(injected["root"])[0]}

    assert min(Image.open(io.BytesIO(jpeg)).size) == 48
    assert record.boxes == raw[record.path].boxes and record.labels == raw[record.path].labels


def test_original_class_folder_layout_is_written_and_scannable(prepared):
    out, manifest, _ = prepared
    root = out / "class_folders" / "finetune_dataset"

    examples = class_folders.scan_split(str(root), "train")

    assert len(examples) == sum(manifest["counts"]["finetune/train"].values())


@pytest.fixture(scope="module")
def shard_sources(prepared):
    out, _, _ = prepared
    return sources.open_sources(data_config(out / "pretrain"))


def _train(source, num_workers=0, **kwargs):
    return pipeline.make_train_dataset(
        source, image_size=SIZE, global_batch_size=4, seed=0, aug=schema.AugmentConfig(),
        num_workers=num_workers, **kwargs)  # fmt: skip


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_prepared_layout_is_detected_with_its_class_list(shard_sources, prepared):
    names, train, val = shard_sources

    assert names == list(hagrid_layout.HAGRID_V2_CLASSES)
    assert len(train) == sum(prepared[1]["counts"]["pretrain/train"].values())
    assert len(val) == sum(prepared[1]["counts"]["pretrain/val"].values())
    assert train.prepared and val.prepared  # so an input-bound run is not told to prepare its data
    with pytest.raises(class_folders.DataLayoutError, match=r"config.data.classes='present' does not apply to "
                       r".*: the prepare stage fixed its 34 classes \(call, .*; leave config.data.classes out"):
        sources.open_sources(data_config(prepared[0] / "pretrain", classes="present"))
    assert not sources.Source(list(range(3))).prepared


def test_a_split_the_corpus_lacks_names_the_flag_and_the_splits_there(prepared):
    out, _, _ = prepared

    with pytest.raises(class_folders.DataLayoutError, match=r"has no split 'test'; set --config.data.eval_split "
                       r".*to one of \['train', 'val'\]\.$"):
        sources.open_sources(data_config(out / "pretrain", eval_split="test"))


def test_evaluating_a_run_of_other_classes_on_a_corpus_names_the_ways_out(prepared):
    """A corpus keeps the class list it was built with; a run of other classes is pointed to the tree."""
    out, _, _ = prepared
    with pytest.raises(class_folders.DataLayoutError, match=r"\(prepared\) has the classes \['call', .*, not the run's "
                       r"\['call', 'fist'\]: a prepared set keeps the class list .* Evaluate on the HaGRID tree it "
                       r"was built from \(--config.data_root=THAT_TREE --config.split=val or test.*or prepare it again "
                       r"with --config.data.classes set to the run's classes, in their order \(with "
                       r"--config.rebuild=True, or into a new --workdir\)"):
        sources.open_split(data_config(out / "pretrain"), "val", ["call", "fist"])


def test_shard_batches_identical_for_0_and_2_workers(shard_sources):
    _, train, _ = shard_sources

    _assert_same(_take(iter(_train(train, 0)), 4), _take(iter(_train(train, 2)), 4))


def test_shard_iterator_resumes_exactly_mid_epoch(shard_sources):
    _, train, _ = shard_sources
    iterator = iter(_train(train))
    _take(iterator, 2)
    state = iterator.get_state()
    expected = _take(iterator, 3)

    resumed = iter(_train(train))
    resumed.set_state(state)

    _assert_same(_take(resumed, 3), expected)


def test_shard_eval_labels_match_the_manifest(shard_sources, prepared):
    names, _, val = shard_sources

    batches = list(pipeline.make_eval_dataset(val, image_size=SIZE, global_batch_size=4, num_workers=0))

    labels = [names[l] for b in batches for l, v in zip(b["label"], b["valid"]) if v]
    assert {c: labels.count(c) for c in set(labels)} == prepared[1]["counts"]["pretrain/val"]


def test_a_damaged_record_in_a_shard_counts_as_an_unreadable_image_naming_its_shard(prepared, tmp_path):
    """Flipped bytes inside a shard that still opens: array_record's chunk hash fails when the record is
    read (maybe hours in); that is one more unreadable image, not a traceback."""
    out, manifest, _ = prepared
    copy = tmp_path / "pretrain"
    shutil.copytree(out / "pretrain", copy)
    index = json.loads((copy / sources.INDEX_FILE).read_text())
    shard = copy / index["splits"]["val"]["shards"][0]
    intact = shard.read_bytes()
    for start in range(64, len(intact) // 2, 256):  # the first damage that hits a chunk's data, not a header
        data = bytearray(intact)
        data[start:start + 32] = bytes(b ^ 0xFF for b in data[start:start + 32])
        shard.write_bytes(bytes(data))
        try:
            reader = records.ShardReader([shard])
            for i in range(len(reader)):
                reader[i]
        except records.UnreadableRecordError:
            break
        except records.ShardError:  # a block header: the shard does not open (tested elsewhere)
            pass
    else:
        pytest.fail("no damage of a record's chunk found")
    total = sum(manifest["counts"]["pretrain/val"].values())

    _, _, val = sources.open_sources(data_config(copy, max_bad_images=total))
    batches = list(pipeline.make_eval_dataset(val, image_size=SIZE, global_batch_size=4, num_workers=0))
    _, _, strict = sources.open_sources(data_config(copy, max_bad_images=0))

    assert 0 < total - sum(int(b["valid"].sum()) for b in batches) < total
    with pytest.raises(pipeline.BadImageBudgetError, match=rf"last: record \d+ of {shard} cannot be read \("):
        list(pipeline.make_eval_dataset(strict, image_size=SIZE, global_batch_size=4, num_workers=0))


def test_hand_crop_shards_store_crops_and_need_hand_crop_mode(tmp_path):
    _tree(tmp_path / "hagrid")
    out = tmp_path / "crops"
    prepare.prepare(prepare_config(tmp_path / "hagrid", view="hand_crop"), str(out))
    index = json.loads((out / "pretrain" / sources.INDEX_FILE).read_text())
    record, jpeg = records.ShardReader([out / "pretrain" / index["splits"]["train"]["shards"][0]])[0]

    assert Image.open(io.BytesIO(jpeg)).size == (40, 40)
    x, y, w, h = crops.gesture_box(record)
    assert max(w, h) == pytest.approx(0.5, abs=0.06)  # the box is 1 / crop_scale_max of the crop
    assert x + w / 2 == pytest.approx(0.5, abs=0.03) and y + h / 2 == pytest.approx(0.5, abs=0.03)
    with pytest.raises(class_folders.DataLayoutError, match="mode=hand_crop"):
        sources.open_sources(data_config(out / "pretrain"))
    _, train, _ = sources.open_sources(data_config(out / "pretrain", mode="hand_crop"))
    assert next(iter(_train(train)))["image"].shape == (4, SIZE, SIZE, 3)
    # Training crops larger than the stored ones would run past them.
    with pytest.raises(class_folders.DataLayoutError, match=r"stored at 2.0 x the gesture box, smaller than "
                       r"training crops of up to config.data.crop_scale_max=3.0 x"):
        sources.open_sources(data_config(out / "pretrain", mode="hand_crop", crop_scale_max=3.0))
    sources.open_sources(data_config(out / "pretrain", mode="hand_crop", crop_scale_max=1.5))


def test_a_hand_crop_keeps_the_free_hands_it_holds_whole(tmp_path):
    """A free hand the stored crop cuts would train a no_gesture crop of a fragment of a hand; one
    outside it cannot be kept at all (session 38's audit: on prepared corpora both went on silently)."""
    path = tmp_path / "frame.jpg"
    fx.write_image(path, size=(400, 400))
    gesture = (0.4, 0.4, 0.2, 0.2)  # the stored crop, at 2 x the box: (0.3, 0.3) to (0.7, 0.7)
    whole, cut, far = (0.32, 0.32, 0.05, 0.05), (0.65, 0.45, 0.1, 0.1), (0.85, 0.85, 0.1, 0.1)
    record = hagrid.HagridRecord("frame", str(path), "call", "user0", (gesture, whole, cut, far),
                                 ("call", "no_gesture", "no_gesture", "no_gesture"))
    stored, _ = prepare.store_image(record, schema.StoreView(view="hand_crop", crop_size=40, crop_scale_max=2.0))
    assert stored.labels == ("call", "no_gesture")
    assert stored.boxes[0] == pytest.approx((0.25, 0.25, 0.5, 0.5), abs=0.01)
    assert stored.boxes[1] == pytest.approx((0.05, 0.05, 0.125, 0.125), abs=0.01)


def test_a_prepared_hand_crop_corpus_without_no_gesture_refuses_free_hand_crops(tmp_path):
    """As a raw tree does: the crops of free hands would have no class to go to (it was a ValueError
    inside the input workers, naming nothing)."""
    _tree(tmp_path / "hagrid")
    out = tmp_path / "crops"
    config = prepare_config(tmp_path / "hagrid", view="hand_crop")
    config.data.classes = "call,like"
    prepare.prepare(config, str(out))
    with pytest.raises(class_folders.DataLayoutError, match=r"config.data.no_gesture_prob=0.3 crops free hands as "
                       r"'no_gesture', which is not among the classes \['call', 'like'\]"):
        sources.open_sources(data_config(out / "finetune", mode="hand_crop", no_gesture_prob=0.3))
    sources.open_sources(data_config(out / "finetune", mode="hand_crop"))


def test_prepare_resumes_after_a_kill_without_redoing_finished_shards(tmp_path, monkeypatch):
    _tree(tmp_path / "hagrid")
    out = tmp_path / "out"
    config = prepare_config(tmp_path / "hagrid")
    real_write, real_check = prepare._write_shard, prepare._check
    written, checked = [], []

    def dies_on_third_shard(task):
        if len(written) == 2:
            raise KeyboardInterrupt("simulated kill")
        written.append(task.path)
        return real_write(task)

    monkeypatch.setattr(prepare, "_write_shard", dies_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare(config, str(out))
    first_mtimes = {p: os.stat(p).st_mtime_ns for p in written}

    def counting_write(task):
        written.append(task.path)
        return real_write(task)

    monkeypatch.setattr(prepare, "_write_shard", counting_write)
    monkeypatch.setattr(prepare, "_check", lambda path: checked.append(path) or real_check(path))
    manifest = prepare.prepare(config, str(out))

    assert len(manifest["shards"]) == len(written) > 2
    assert not set(first_mtimes) & set(written[2:])  # finished shards were not written again
    assert {p: os.stat(p).st_mtime_ns for p in first_mtimes} == first_mtimes
    assert checked == []  # every image was decode-checked before the kill
    assert not list(out.rglob("*.tmp"))


def test_a_copied_workdir_is_the_same_preparation_and_its_damaged_shards_are_written_again(tmp_path, monkeypatch):
    tree = _tree(tmp_path / "hagrid")
    config = prepare_config(tree.root)
    manifest = prepare.prepare(config, str(tmp_path / "out"))
    out = tmp_path / "copy"
    shutil.copytree(tmp_path / "out", out)
    cut, gone = [out / name for name in manifest["shards"] if name.startswith("pretrain/train/")][:2]
    cut.write_bytes(cut.read_bytes()[:1000])
    gone.unlink()
    index = out / "pretrain" / sources.INDEX_FILE
    index.write_text(index.read_text()[:20])

    with pytest.raises(class_folders.DataLayoutError, match=rf"{index} is damaged .*rerun the prepare stage"):
        sources.open_sources(data_config(out / "pretrain"))
    index.write_bytes((tmp_path / "out" / "pretrain" / sources.INDEX_FILE).read_bytes())
    with pytest.raises(records.ShardError, match=rf"{cut} cannot be read \(.*\): rerun the prepare stage"):
        sources.open_sources(data_config(out / "pretrain"))
    with pytest.raises(class_folders.DataLayoutError, match=r"has no index.json: config.data.layout=prepared"):
        sources.open_sources(data_config(out, layout="prepared"))
    index.write_text("[]")
    with pytest.raises(class_folders.DataLayoutError, match=rf"{index} is damaged \(not a prepared corpus's index"):
        sources.open_sources(data_config(out / "pretrain"))
    index.unlink()  # as a prepare killed before its last write leaves it: not class folders without classes
    with pytest.raises(class_folders.DataLayoutError, match=rf"{out / 'pretrain'} holds shards of a prepare stage "
                       rf"that did not finish \(no index.json\); rerun the same prepare command \(its --workdir is "
                       rf"{out}\)"):
        sources.open_sources(data_config(out / "pretrain"))

    written = []
    real_write = prepare._write_shard
    monkeypatch.setattr(prepare, "_write_shard", lambda task: written.append(task.path) or real_write(task))
    assert prepare.prepare(config, str(out))["shards"] == manifest["shards"]  # not another preparation

    assert sorted(written) == sorted([str(cut), str(gone)])  # only the damaged ones
    for name in manifest["shards"]:
        assert (out / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    sources.open_sources(data_config(out / "pretrain"))
    entry = json.loads(index.read_text())
    entry["splits"]["train"]["count"] += 1  # as after a shard was swapped for another preparation's
    index.write_text(json.dumps(entry))
    with pytest.raises(class_folders.DataLayoutError, match=r"Split 'train' of .* holds \d+ records where the "
                       r"prepare stage wrote \d+: its shards were replaced since"):
        sources.open_sources(data_config(out / "pretrain"))


def test_sigterm_stops_prepare_with_the_resume_hint_and_a_rerun_finishes(tmp_path, monkeypatch):
    import signal

    from gmae_jax.train.preemption import Preempted

    _tree(tmp_path / "hagrid")
    out, config = tmp_path / "out", prepare_config(tmp_path / "hagrid")
    real_write, written = prepare._write_shard, []

    def terminated_during_the_second_shard(task):
        if len(written) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        written.append(task.path)
        return real_write(task)

    monkeypatch.setattr(prepare, "_write_shard", terminated_during_the_second_shard)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="rerun the same command to go on"):
        stages.run(config, str(out))
    assert signal.getsignal(signal.SIGTERM) == before  # the stage's handler is gone again
    assert os.path.exists(written[0])
    monkeypatch.setattr(prepare, "_write_shard", real_write)
    manifest = stages.run(config, str(out))
    assert all((out / name).exists() for name in manifest["shards"])


def test_prepare_refuses_a_workdir_of_another_preparation(tmp_path):
    _tree(tmp_path / "hagrid")
    prepare.prepare(prepare_config(tmp_path / "hagrid"), str(tmp_path / "out"))
    plan = (tmp_path / "out" / "plan.json").read_text()
    (tmp_path / "out" / "plan.json").write_text("[1, 2]")
    with pytest.raises(class_folders.DataLayoutError, match=r"plan.json is damaged \(no plan and settings\)"):
        prepare.prepare(prepare_config(tmp_path / "hagrid"), str(tmp_path / "out"))
    (tmp_path / "out" / "plan.json").write_text(plan)

    with pytest.raises(class_folders.DataLayoutError, match=r"different preparation \(seed: 0 -> 7\); rerun with"):
        prepare.prepare(prepare_config(tmp_path / "hagrid", seed=7), str(tmp_path / "out"))
    fx.write_image(tmp_path / "hagrid" / "hagrid_dataset" / "call" / "call-000-0.jpg", seed=3)
    (tmp_path / "hagrid" / "hagrid_dataset" / "call" / "call-001-0.jpg").unlink()  # one image fewer
    with pytest.raises(class_folders.DataLayoutError, match=r"\(the same settings, but the images or annotations "
                       r"changed since\); rewrite them here with --config.rebuild=True"):  # its settings: these
        prepare.prepare(prepare_config(tmp_path / "hagrid"), str(tmp_path / "out"))


def test_a_rerun_with_another_class_list_keeps_the_shards_and_says_the_lists_changed(tmp_path, caplog):
    _tree(tmp_path / "hagrid")
    prepare.prepare(prepare_config(tmp_path / "hagrid"), str(tmp_path / "out"))
    assert not [r for r in caplog.records if "class list changed" in r.getMessage()]
    present = prepare_config(tmp_path / "hagrid")
    present.data.classes = "present"
    with caplog.at_level("INFO"):
        prepare.prepare(present, str(tmp_path / "out"))
    changed = [r.getMessage() for r in caplog.records if "class list changed" in r.getMessage()]
    assert len(changed) == 1 and changed[0].startswith(
        f"the class list changed (config.data.classes=present): {len(hagrid_layout.HAGRID_V2_CLASSES)} -> "
        f"{len(CLASSES)} classes (")
    assert "runs trained on the earlier list no longer evaluate on these corpora" in changed[0]
    index = json.loads((tmp_path / "out" / "pretrain" / "index.json").read_text())
    assert index["class_names"] == sorted(CLASSES)
    written = [r.getMessage() for r in caplog.records if "shards already written" in r.getMessage()]
    assert written[-1].endswith("; writing 0")  # the same images: every shard kept


def test_prepare_refuses_a_training_run_or_the_raw_tree_as_its_workdir_and_bad_seeds_and_workers(tmp_path):
    _tree(tmp_path / "hagrid")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    config = prepare_config(tmp_path / "hagrid")

    with pytest.raises(config_lib.ConfigError, match=r"holds a training run \(its checkpoints/ is there\)"):
        stages.run(config, str(tmp_path / "run"))
    with pytest.raises(config_lib.ConfigError,
                       match=r"/hagrid/prepared is inside config.data.root=.*/hagrid, whose images the run reads"):
        stages.run(config, str(tmp_path / "hagrid" / "prepared"))
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
    assert not (tmp_path / "hagrid" / "prepared").exists()
    for field, value, message in (("seed", -1, r"config.seed=-1 must be a whole number in \[0, 2\*\*32\)"),
                                  ("num_workers", -2, r"config.num_workers=-2 must be >= 0 \(0 = in this process\) "
                                                      r"or -1")):
        with pytest.raises(config_lib.ConfigError, match=message):
            stages.validate(prepare_config(tmp_path / "hagrid", **{field: value}))


def test_rebuild_replaces_another_preparation_and_keeps_the_decode_checks(tmp_path):
    tree, out = _tree(tmp_path / "hagrid"), tmp_path / "out"
    first = prepare.prepare(prepare_config(tree.root, records_per_shard=4, class_folders=True), str(out))
    checked = out / "checked.jsonl"
    checks_before = len(checked.read_text().splitlines())
    tree.image_path("call", "call-001-0").unlink()  # the images changed since (one fewer) ...
    fx.write_image(tree.image_path("call", "call-000-0"), seed=3)  # ... and one was replaced

    # ... and another recipe: other corpora, a shard size that renames every shard.
    config = prepare_config(tree.root, records_per_shard=8, rebuild=True)
    config.corpora = {"all": 1.0}
    second = prepare.prepare(config, str(out))

    assert sum(sum(counts.values()) for counts in second["counts"].values()) == NUM_USERS * len(CLASSES) - 1
    on_disk = sorted(os.path.relpath(path, out) for path in out.rglob(f"*{records.SHARD_SUFFIX}"))
    assert on_disk == second["shards"] and not set(on_disk) & set(first["shards"])
    assert not (out / "pretrain").exists() and not (out / "class_folders").exists()
    # Only the replaced image was decoded again; the plan is the new one (a plain rerun is accepted).
    assert len(checked.read_text().splitlines()) == checks_before + 1
    config.rebuild = False
    assert prepare.prepare(config, str(out))["shards"] == second["shards"]


def test_a_bucket_workdir_is_refused_before_its_lock_is_taken(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_lock, "hold", lambda workdir: pytest.fail(f"{workdir} would be locked"))
    with pytest.raises(schema.ConfigError, match=r"the prepare stage writes to a local folder"):
        stages.run(prepare_config(tmp_path), "gs://no-such-bucket/prepared")


def test_rebuild_with_the_same_folders_writes_every_shard(tmp_path):
    tree, out = _tree(tmp_path / "hagrid"), tmp_path / "out"
    prepare.prepare(prepare_config(tree.root), str(out))

    bigger = prepare.prepare(prepare_config(tree.root, image_side=56, rebuild=True), str(out))

    assert bigger["view"]["image_side"] == 56 and all((out / name).exists() for name in bigger["shards"])


def test_images_repaired_after_a_refused_prepare_are_checked_again(tmp_path):
    tree = _tree(tmp_path / "hagrid")
    bad = fx.inject_truncated_jpeg(tree, "train", "like")
    out, config = tmp_path / "out", prepare_config(tree.root)
    config.data.max_dropped_fraction = 0.0
    with pytest.raises(class_folders.DataLayoutError, match=rf"undecodable 1 \(like 1\) \(e\.g\. undecodable: "
                       rf"{re.escape(str(bad))}: "):  # the file to fix, not a count alone
        prepare.prepare(config, str(out))

    fx.write_image(bad)  # what the error asks for: fix the data, rerun the same command
    manifest = prepare.prepare(config, str(out))

    assert "undecodable" not in manifest["skipped"]
    assert sum(sum(counts.values()) for counts in manifest["counts"].values()) == NUM_USERS * len(CLASSES) + 1


def test_an_image_replaced_since_its_decode_check_is_checked_again(tmp_path):
    tree = _tree(tmp_path / "hagrid")
    bad = fx.inject_truncated_jpeg(tree, "train", "like")
    out, config = tmp_path / "out", prepare_config(tree.root)
    config.data.max_dropped_fraction = 0.0
    with pytest.raises(class_folders.DataLayoutError, match=r"undecodable 1 \(like 1\)"):
        prepare.prepare(config, str(out))

    fx.write_image(bad)  # the user extracts the class again: that image is whole now,
    cut = tree.image_path("call", "call-000-0")
    cut.write_bytes(cut.read_bytes()[:500])  # but one that passed its check came out cut short

    with pytest.raises(class_folders.DataLayoutError, match=r"undecodable 1 \(call 1\)"):
        prepare.prepare(config, str(out))


def test_a_rerun_that_asks_for_class_folders_writes_them_beside_the_same_shards(tmp_path):
    tree = _tree(tmp_path / "hagrid")
    out = tmp_path / "out"
    first = prepare.prepare(prepare_config(tree.root), str(out))
    shards = {name: (out / name).read_bytes() for name in first["shards"]}
    assert not (out / "class_folders").exists()

    second = prepare.prepare(prepare_config(tree.root, class_folders=True), str(out))

    assert {name: (out / name).read_bytes() for name in second["shards"]} == shards
    copies = list((out / "class_folders").rglob("*.jpg"))
    assert len(copies) == NUM_USERS * len(CLASSES)


@pytest.mark.parametrize("given", ["workdir", "corpus"])
def test_prepare_refuses_its_own_output_naming_the_raw_tree(prepared, given):
    out, _, injected = prepared
    root = out if given == "workdir" else out / "pretrain"

    with pytest.raises(class_folders.DataLayoutError, match=rf"^{root} holds shards the prepare stage wrote; point "
                       rf"--config.data.root at the raw HaGRID tree they were prepared from \({injected['root']}, per"):
        prepare.prepare(prepare_config(root), str(out.parent / "again"))


def test_too_few_people_for_every_split_is_refused_before_any_shard(tmp_path):
    tree = fx.make_tree(tmp_path / "hagrid", "v2", classes=CLASSES, num_users=3, images_per_user=1, splits=("train",))
    out = tmp_path / "out"
    with pytest.raises(class_folders.DataLayoutError, match=r"finetune/val, pretrain/val would hold no images: the 3 "
                       r"people of .* are too few for config.corpora=\{'finetune': 0.3, 'pretrain': 0.7\}"):
        prepare.prepare(prepare_config(tree.root), str(out))
    assert not list(out.rglob(f"*{records.SHARD_SUFFIX}")) and not (out / "plan.json").exists()


def test_a_tree_with_its_class_folders_one_level_too_deep_is_named_before_any_shard(tmp_path):
    tree = fx.make_tree(tmp_path / "hagrid", "v2", classes=CLASSES, num_users=3, images_per_user=1)
    images = tree.root / "hagrid_dataset"
    images.rename(tmp_path / "moved")
    images.mkdir()
    (tmp_path / "moved").rename(images / "hagrid_dataset")
    out = tmp_path / "out"
    with pytest.raises(class_folders.DataLayoutError, match=rf"^{tree.root} \(hagrid_v2\) holds no usable images\. Its "
                       rf"class folders are one level deeper, in {images / 'hagrid_dataset'} \(.*\): move them up"):
        prepare.prepare(prepare_config(tree.root), str(out))
    assert not out.exists()


def test_classes_without_images_are_warned_of_by_prepare(tmp_path, caplog):
    tree = fx.make_tree(tmp_path / "hagrid", "v2", classes=CLASSES, num_users=3, images_per_user=1, splits=("train",))
    with caplog.at_level("WARNING"), pytest.raises(class_folders.DataLayoutError, match="too few"):
        prepare.prepare(prepare_config(tree.root), str(tmp_path / "out"))
    absent = len(hagrid_layout.HAGRID_V2_CLASSES) - len(CLASSES)
    assert re.search(rf"{absent} of the {len(hagrid_layout.HAGRID_V2_CLASSES)} classes \(config.data.classes=hagrid\) "
                     rf"have no image in {tree.root}: dislike, fist, four, mute, ok, \.\.\.\. A classifier "
                     r"fine-tuned on these corpora could never learn them", caplog.text)


def test_finetuning_on_a_prepared_corpus_refuses_classes_without_images_naming_the_way_out(prepared):
    """The corpus's index counts its classes: the shards are not read for it."""
    out, manifest, _ = prepared
    index = json.loads((out / "finetune" / sources.INDEX_FILE).read_text())
    assert index["splits"]["train"]["class_counts"] == manifest["counts"]["finetune/train"]
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.data.root, config.num_classes = str(out / "finetune"), len(index["class_names"])
    absent = len(index["class_names"]) - len(CLASSES)
    with pytest.raises(config_lib.ConfigError, match=rf"holds no image of {absent} of the {len(index['class_names'])} "
                       r"classes \(dislike, fist, four, mute, ok, \.\.\.\), which the classifier could never learn: "
                       rf"prepare the corpus again with --config.data.classes={','.join(CLASSES)} \(the "
                       r"classes with images here\)"):
        finetune_stage.open_data(config)


def test_prepare_needs_user_ids(tmp_path):
    fx.write_image(tmp_path / "train" / "palm" / "a.jpg")

    with pytest.raises(class_folders.DataLayoutError, match="splits by person"):
        prepare.prepare(prepare_config(tmp_path), str(tmp_path / "out"))


def _main(*args):
    return subprocess.run([sys.executable, "-m", "gmae_jax.main", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_prepare_then_finetune_on_hand_crop_shards_through_the_entry_point(tmp_path):
    _tree(tmp_path / "hagrid")
    out = tmp_path / "prepared"
    prepared = _main("--config=configs/prepare.py", f"--workdir={out}", "--config.view=hand_crop",
                     f"--config.data.root={tmp_path / 'hagrid'}", "--config.num_workers=1",
                     "--config.data.classes=present")  # the official 34 would leave 30 without an image
    assert prepared.returncode == 0, prepared.stderr[-3000:]

    result = _main("--config=configs/finetune.py:runlocal", f"--workdir={tmp_path / 'run'}",
                   f"--config.data.root={out / 'finetune'}", "--config.data.mode=hand_crop",
                   f"--config.num_classes={len(CLASSES)}", "--config.total_steps=2", "--config.model.img_size=32",
                   "--config.model.depth=1")

    assert result.returncode == 0, result.stderr[-3000:]
    assert f"(prepared, hand_crop): {len(CLASSES)} classes" in result.stderr
    assert "[finetune] step 2/2" in result.stderr and "accuracy" in result.stderr


def test_a_killed_worker_stops_prepare_with_one_line_instead_of_waiting_forever():
    """multiprocessing's Pool replaced a killed worker and waited forever for the item it held."""
    import multiprocessing
    import signal
    import time

    items = [0.3] * 40
    before = {child.pid for child in multiprocessing.active_children()}
    results = worker_pool.unordered_map(time.sleep, items, 2, "decode-check")
    started = time.monotonic()
    with pytest.raises(worker_pool.WorkerDiedError, match=r"^a worker process of the prepare stage died "
                       r"\(decode-check\): most often the kernel's out-of-memory killer.*this run used 2\) if memory ran out$"):
        for taken, _ in enumerate(results):
            if taken == 0:
                victim = next(c for c in multiprocessing.active_children() if c.pid not in before)
                os.kill(victim.pid, signal.SIGKILL)
                time.sleep(1.0)  # the pool breaks while the consumer works (the next submit then fails)
    assert time.monotonic() - started < 30  # the 40 items would take 6 s on 2 workers; forever before
    time.sleep(0.5)
    assert not [c for c in multiprocessing.active_children() if c.pid not in before]  # the other worker stopped too


def test_parallel_items_all_come_back_from_the_workers():
    assert sorted(worker_pool.unordered_map(abs, list(range(-20, 0)), 2, "shards")) == list(range(1, 21))


def test_num_workers_minus_1_starts_a_worker_per_core_the_process_may_use(tmp_path, monkeypatch):
    """Under a CPU affinity (taskset, a SLURM or container CPU set) the machine's core count would
    start more workers than there are cores to run them."""
    root = tmp_path / "hagrid"
    _tree(root)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    started = []
    real_map = worker_pool.unordered_map

    def counting_map(fn, items, num_workers, what):
        started.append(num_workers)
        return real_map(fn, items, num_workers, what)

    monkeypatch.setattr(worker_pool, "unordered_map", counting_map)
    prepare.prepare(prepare_config(root, num_workers=-1), str(tmp_path / "out"))
    assert started == [1, 1]  # the decode check's pool and the shard writers'
    # The input pipeline's meaning of 0, as in config.data.num_workers: no worker processes.
    assert host_resources.pool_size(0) == 1 and host_resources.pool_size(3) == 3



@pytest.mark.parametrize("version", ["v2", "v1"])
def test_hagrids_official_test_split_stays_out_of_the_corpora_unless_asked(tmp_path, version, caplog):
    """Its people trained on, a score on HaGRID's test split would not be comparable with published ones."""
    classes = [name for name in CLASSES if name in (hagrid_layout.HAGRID_V2_CLASSES if version == "v2"
                                                    else hagrid_layout.HAGRID_V1_CLASSES)]
    tree = fx.make_tree(tmp_path / "hagrid", version, classes=classes, num_users=36, images_per_user=1)
    splits_of = ("train", "val", "test") if version == "v2" else ("ann_train_val", "ann_test")  # user k: k % len
    test_users = {f"user{k:03d}" for k in range(36) if splits_of[k % len(splits_of)].endswith("test")}
    config = prepare_config(tree.root, num_workers=0, splits={"train": 0.8, "val": 0.2})  # v1: 18 people left
    with caplog.at_level("INFO"):
        manifest = prepare.prepare(config, str(tmp_path / "out"))
    assert "(HaGRID's official test split) is kept out of the corpora" in caplog.text
    kept = sum(sum(counts.values()) for counts in manifest["counts"].values())
    assert kept == (36 - len(test_users)) * len(classes)
    stored = [r for rs in _read_back(tmp_path / "out").values() for r in rs]
    assert len(stored) == kept and not {r.user_id for r in stored} & test_users

    config.include_official_test = True
    manifest = prepare.prepare(config, str(tmp_path / "with_test"))
    assert sum(sum(counts.values()) for counts in manifest["counts"].values()) == 36 * len(classes)


def test_a_duplicate_annotated_as_another_gesture_names_both_labels(tmp_path):
    """The same photo under two gestures: one annotation is wrong, and the drop must say so."""
    tree = _tree(tmp_path / "hagrid")
    original = tree.image_path("call", "call-000-0")
    copy = tree.add("train", "like", "zz-copy", fx.entry(["like"], user_id="user000"))
    copy.write_bytes(original.read_bytes())
    manifest = prepare.prepare(prepare_config(tree.root, num_workers=0), str(tmp_path / "out"))
    assert manifest["skipped"]["duplicate"] == [f"{copy}: same bytes as {original}; annotated ['call'] there and "
                                                "['like'] here"]
