"""The stage registry, restoring a run from its workdir, and the evaluate and predict stages on a
run whose training images were deleted (they must never open the training split)."""

import csv
import dataclasses
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import textwrap
import types

import hagrid_fixtures as fx
import jax
import numpy as np
import pytest
from PIL import Image

import saved_weights
from gmae_jax import config_lib, schema, stages
from gmae_jax.data import inputs, synthetic, views
from gmae_jax.train import resume_check, run_folder, setup
from gmae_jax.train.summaries import Summaries

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
CLASSES = ("fist", "one", "peace", "three", "four", "palm")  # > 5: top-5 accuracy is reported


def load(name, arg=None):
    return config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), name, arg)


def test_every_config_file_is_a_registered_stage_named_like_its_file():
    names = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(CONFIGS, "*.py")))
    assert names == sorted(stages.STAGES)
    for name in names:
        assert load(name).stage == name
        assert callable(stages.get(name).run) and callable(stages.get(name).validate)


def test_unknown_stage_is_a_config_error():
    with pytest.raises(config_lib.ConfigError, match=r"config.stage='train' must be one of \["):
        stages.get("train")


@pytest.mark.parametrize("stage,field,value,message", [
    ("evaluate", "checkpoint", "newest", "config.checkpoint='newest' must be 'latest', 'best' or a step number"),
    ("evaluate", "num_workers", -3, r"config.num_workers=-3 must be >= 0 \(0 = in this process\) or -1"),
    ("predict", "inputs", "", "config.inputs is empty"),
    ("predict", "view", "square", "config.view='square' must be one of"),
    ("finetune", "best_metric", "f2", "config.best_metric='f2' must be '' or one of"),
    ("prepare", "splits", {"train": 0.9, "val": 0.2}, "config.splits=.* must be positive fractions that sum to 1"),
    ("prepare", "image_side", 0, r"config.image_side=0 must be at least 32 pixels \(the smallest model input"),
    ("prepare", "crop_size", 1, "config.crop_size=1 must be at least 32 pixels"),
    ("prepare", "num_workers", 100000, "config.num_workers=100000 is more than 4 worker processes per core"),
    ("predict", "num_workers", -5, r"config.num_workers=-5 must be >= 0"),
    ("prepare", "crop_scale_max", 0.5, "config.crop_scale_max=0.5 must be >= 1 and finite: a stored crop holds"),
    ("prepare", "crop_scale_max", float("inf"), "config.crop_scale_max=inf must be >= 1 and finite"),
    ("prepare", "jpeg_quality", 0, r"config.jpeg_quality=0 must be in \[1, 100\]"),
])
def test_each_stage_validates_its_own_fields(stage, field, value, message, tmp_path):
    config = load(stage, "runlocal" if stage == "finetune" else None)
    config.checkpoint_dir, config.inputs = str(tmp_path), str(tmp_path)
    if stage == "finetune":
        config.data.root = str(tmp_path)
    config[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        stages.validate(config)


@pytest.mark.parametrize("field,value,message", [
    ("layout", "foo", r"config.data.layout='foo' must be one of \('auto', 'hagrid_v1', 'hagrid_v2'\)"),
    ("root", "", "config.data.root is empty; set --config.data.root=a HaGRID tree"),
    ("max_dropped_fraction", -1.0, r"config.data.max_dropped_fraction=-1.0 must be in \[0, 1\]"),
    ("max_dropped_fraction", float("nan"), r"config.data.max_dropped_fraction=nan must be in \[0, 1\]"),
])
def test_the_prepare_stage_checks_its_data_section(field, value, message):
    config = load("prepare")
    config.data[field] = value
    with pytest.raises(config_lib.ConfigError, match=message):
        stages.validate(config)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 4-step fine-tune whose training folder is then deleted."""
    root = tmp_path_factory.mktemp("data")
    synthetic.write_demo_dataset(str(root), image_size=32, train_per_class=4, val_per_class=2, classes=CLASSES)
    workdir = str(tmp_path_factory.mktemp("finetune"))
    config = load("finetune", "runlocal")
    config.update(num_classes=len(CLASSES), total_steps=4, eval_every=2, checkpoint_every=2, keep_checkpoints=1)
    config.model.depth = 1  # one block of each kind: the run folder is the point, not the model
    config.data.root = str(root)
    metrics = stages.run(config, workdir)
    shutil.rmtree(root / "train")
    return workdir, root, metrics


@pytest.mark.slow
def test_restore_run_rebuilds_weights_without_optimiser_state(run_dir):
    workdir, _, _ = run_dir
    restored = setup.restore_run(os.path.join(workdir, "checkpoints"))  # the folder init_from used to take
    saved = saved_weights.restore_params(os.path.join(workdir, "checkpoints"))
    assert restored.step == saved["step"] == 4 and restored.class_names == sorted(CLASSES)
    assert set(vars(restored.weights)) == {"step", "params", "batch_stats"}
    for got, want in zip(jax.tree.leaves(restored.weights.params), jax.tree.leaves(saved["params"])):
        np.testing.assert_array_equal(np.asarray(got), want)


def test_a_classes_json_that_does_not_name_every_output_is_one_line(run_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(run_dir[0], workdir)
    (workdir / "classes.json").write_text('["fist", "palm"]')
    with pytest.raises(config_lib.ConfigError, match=rf"{workdir}/classes.json names 2 classes but the run's "
                       rf"classifier has {len(CLASSES)} outputs"):
        setup.restore_run(str(workdir))


@pytest.mark.slow
def test_best_checkpoint_is_kept_beside_the_latest(run_dir):
    workdir, _, _ = run_dir
    manager = setup.checkpoint_manager(workdir, run_folder.load_run_config(workdir))
    best, latest = manager.best_step(), manager.latest_step()
    history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    accuracy = {r["step"]: r["accuracy"] for r in history if r["split"] == "val"}
    assert latest == 4 and best == max(accuracy, key=lambda s: (accuracy[s], s))  # ties: the later step
    assert sorted(manager.all_steps()) == sorted({best, latest})  # keep_checkpoints=1 plus the best


@pytest.mark.slow
def test_evaluate_without_the_training_split_reports_classifier_metrics(run_dir, tmp_path, capsys):
    workdir, root, trained = run_dir
    config = load("evaluate")
    config.update(checkpoint_dir=workdir, num_workers=0, batch_size=13)  # rounded up to 16 for the 8 devices
    (tmp_path / "reconstructions.png").write_bytes(b"an earlier evaluation of a pretraining run")
    result = stages.run(config, str(tmp_path))
    assert result["accuracy"] == pytest.approx(trained["accuracy"])
    assert result["checkpoint_step"] == 4
    saved = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert saved["evaluated"] == {"checkpoint_dir": workdir, "data_root": str(root), "split": "val",
                                  "images": 2 * len(CLASSES), "unreadable": 0}
    assert not (tmp_path / "reconstructions.png").exists()  # it would pass for this checkpoint's
    for key in ("accuracy", "top5_accuracy", "macro_f1", "weighted_f1", "precision/palm", "recall/fist", "f1/one"):
        assert 0.0 <= saved[key] <= 1.0, key
    assert saved["top5_accuracy"] >= saved["accuracy"]
    table = capsys.readouterr().out
    # An image that no longer reads is left out of the metrics, and so of the count they were measured on.
    copy = tmp_path / "data"
    shutil.copytree(os.path.join(root, "val"), copy / "val")
    broken = next((copy / "val" / "palm").iterdir())
    broken.write_bytes(b"\xff\xd8 cut short")
    config.update(data_root=str(copy))
    stages.run(config, str(tmp_path / "again"))
    again = json.loads((tmp_path / "again" / "eval_metrics.json").read_text())
    assert (again["evaluated"]["images"], again["evaluated"]["unreadable"]) == (2 * len(CLASSES) - 1, 1)
    assert sum(again[f"support/{name}"] for name in CLASSES) == 2 * len(CLASSES) - 1
    assert all(name in table for name in CLASSES) and "weighted avg" in table
    picture = Image.open(tmp_path / "confusion_matrix.png")
    # A label margin of 8 + 7 px per character of the longest name, 36 px cells, a 24 px caption.
    assert picture.height == 8 + 7 * 5 + 6 * 36 + 24 and picture.width >= 8 + 7 * 5 + 6 * 36 + 8
    assert len(np.unique(np.asarray(picture.convert("L")))) > 2  # not blank
    # The misclassified images, each framed red with its true and predicted class (6 to a row).
    matrix = np.asarray(json.loads((tmp_path / "confusion_matrix.json").read_text())["matrix"])
    wrong = int(matrix.sum() - np.trace(matrix))
    sheet = np.asarray(Image.open(tmp_path / "misclassified.png").convert("RGB"))
    # Below a one-line title (16 px) that says how many of the split were misclassified, at which step.
    corners = [tuple(sheet[16 + (k // 6) * (140 + 3 * 12 + 4) + 3, (k % 6) * 140 + 3]) for k in range(max(wrong, 1))]
    assert corners == ([(200, 0, 0)] * wrong if wrong else [(255, 255, 255)])


@pytest.mark.parametrize("stage", ["evaluate", "predict"])
def test_weights_that_give_non_finite_outputs_stop_with_one_line_naming_the_step(run_dir, tmp_path, monkeypatch,
                                                                                 stage):
    """Weights giving NaN (a diverged run's, or damaged in a step saved before fingerprints) restored, and
    evaluate and predict reported NaN metrics and probabilities with status 0."""
    workdir, root, _ = run_dir
    real_restore = setup.restore_run

    def damaged(*args, **kwargs):
        restored = real_restore(*args, **kwargs)
        params = jax.tree.map(lambda x: x * np.nan, restored.weights.params)
        return dataclasses.replace(restored, weights=restored.weights.replace(params=params))

    monkeypatch.setattr(setup, "restore_run", damaged)
    config = load(stage)
    config.update(checkpoint_dir=workdir)
    config.update({"inputs": str(root / "val")} if stage == "predict" else {"num_workers": 0})
    with pytest.raises(config_lib.ConfigError, match=rf"^checkpoint step 4 of {workdir} gives non-finite "
                       r"(metrics|probabilities): its weights are damaged .*use another step "
                       r"\(--config.checkpoint=N\)$"):
        stages.run(config, str(tmp_path / "out"))
    assert not (tmp_path / "out" / ("eval_metrics.json" if stage == "evaluate" else "predictions.csv")).exists()


@pytest.mark.parametrize("stage", ["evaluate", "export", "predict"])
def test_a_run_to_read_that_is_missing_or_a_file_is_named_as_such(tmp_path, stage):
    (tmp_path / "a_file").write_text("")
    config = load(stage)
    config.update(inputs=str(tmp_path / "a_file")) if stage == "predict" else None
    for given, what in (("missing", "does not exist"), ("a_file", "is a file, not a run's workdir")):
        config.checkpoint_dir = str(tmp_path / given)
        with pytest.raises(config_lib.ConfigError, match=f"^{tmp_path / given} {what}: point at the workdir of a "):
            stages.run(config, str(tmp_path / "out"))


@pytest.mark.parametrize("stage, field", [("pretrain", "data.root"), ("evaluate", "data_root"),
                                          ("study", "pretrain_data")])
def test_a_workdir_inside_the_data_it_reads_is_refused_before_anything_is_written(tmp_path, stage, field):
    """A pretraining workdir in <root>/train was read as a class folder ('holds no images')."""
    config = load(stage)
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = str(tmp_path)
    with pytest.raises(config_lib.ConfigError, match=rf"--workdir={tmp_path}/train/run is inside config.{field}="
                       rf"{tmp_path}, whose images the run reads"):
        stages.run(config, str(tmp_path / "train" / "run"))
    assert list(tmp_path.iterdir()) == []


def test_a_finetune_whose_init_from_is_its_own_workdir_is_refused(tmp_path):
    config = load("finetune", "runlocal")
    for init_from in (tmp_path / "ft", tmp_path / "ft" / "checkpoints"):
        config.init_from = str(init_from)
        with pytest.raises(config_lib.ConfigError, match=rf"config.init_from={init_from} is this fine-tune's own "
                           rf"--workdir={tmp_path / 'ft'}; point it at the workdir of a pretraining run"):
            stages.run(config, str(tmp_path / "ft"))


@pytest.mark.parametrize("stage, output", [("evaluate", "eval_metrics.json"), ("export", "model.pth")])
def test_an_output_name_taken_by_a_folder_is_one_line_before_anything_runs(run_dir, tmp_path, stage, output):
    """It failed with a traceback after the work was done (evaluate) or half written (export)."""
    (tmp_path / "out" / output).mkdir(parents=True)
    config = load(stage)
    config.update(checkpoint_dir=run_dir[0])
    with pytest.raises(config_lib.ConfigError, match=rf"out/{output} is a folder, where (evaluate|the export) writes "
                       "a file of that name"):
        stages.run(config, str(tmp_path / "out"))
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == [output]


@pytest.mark.slow
def test_predict_lists_every_file_once_with_probabilities(run_dir, tmp_path, caplog):
    workdir, root, _ = run_dir
    inputs = tmp_path / "inputs"
    shutil.copytree(root / "val", inputs)
    (inputs / "notes.txt").write_text("not an image")
    (inputs / "palm" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(inputs), top_k=len(CLASSES), batch_size=5)
    out = tmp_path / "out"
    with caplog.at_level("INFO"):
        counts = stages.run(config, str(out))
    assert f"; wrote {out}/predictions.csv, {out}/predictions.jsonl, {out}/predictions.png" in caplog.text

    files = sorted(str(p) for p in inputs.rglob("*") if p.is_file())
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    with open(out / "skipped.csv") as f:
        skipped = {r["file"]: r["reason"] for r in csv.DictReader(f)}
    predicted = [r["file"] for r in rows]
    assert sorted(predicted + list(skipped)) == files  # every file exactly once
    assert counts == {"predicted": len(CLASSES) * 2, "skipped": 2}
    assert skipped[str(inputs / "notes.txt")].startswith("not an image")
    assert skipped[str(inputs / "palm" / "broken.jpg")].startswith("unreadable")
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [line["file"] for line in lines] == predicted
    assert {(line["run"], line["step"]) for line in lines} == {(workdir, 4)}  # the weights that predicted them
    assert {(row["run"], row["step"]) for row in rows} == {(workdir, "4")}
    for line in lines:
        assert sorted(entry["class"] for entry in line["top_k"]) == sorted(CLASSES)
        probs = [entry["prob"] for entry in line["top_k"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5) and probs == sorted(probs, reverse=True)
    # Class folders annotate their images, as they do for training: the summary says how many agree.
    assert {row["annotation"] for row in rows} == set(CLASSES)
    assert all(row["annotation"] == os.path.basename(os.path.dirname(row["file"])) for row in rows)
    agree = sum(row["class_1"] == row["annotation"] for row in rows)
    assert f"; the top class is the annotated one for {agree} of {len(rows)}; 2 skipped ({out}/skipped.csv" in \
        caplog.text
    # 12 inputs, 6 to a row of 128 px tiles with 6 px borders and three caption lines (with the annotation)
    assert Image.open(out / "predictions.png").size == (6 * 140, 2 * (140 + 3 * 12 + 4))


def test_predict_in_a_batch_far_larger_than_its_inputs_runs_them_in_one_of_their_size(run_dir, tmp_path):
    """It allocated the whole batch (a numpy MemoryError at 2**40; at a large ordinary batch, 224 px,
    the out-of-memory killer): evaluate's rule, whole rows of the devices and no more than the inputs."""
    workdir, root, _ = run_dir
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(root / "val" / "palm"), batch_size=2**40)
    counts = stages.run(config, str(tmp_path / "out"))
    assert counts == {"predicted": len(list((root / "val" / "palm").iterdir())), "skipped": 0}


def test_predict_sees_inputs_as_the_run_saw_its_evaluation_images(run_dir, tmp_path, caplog):
    """A class-folder run evaluated on centre crops: 'auto' centre-crops a HaGRID tree's frames too
    (it cut them to the gesture box, which the model never saw); 'hand_crop' still can be asked for."""
    workdir, _, _ = run_dir
    assert resume_check.recorded_view(workdir) == "original"
    fx.make_tree(tmp_path / "hagrid", "v2", classes=("call", "like"), num_users=2, images_per_user=1)
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(tmp_path / "hagrid"), top_k=1)

    def top_classes(view):
        config.view = view
        stages.run(config, str(tmp_path / view))
        return [json.loads(line)["top_k"] for line in (tmp_path / view / "predictions.jsonl").read_text().splitlines()]

    with caplog.at_level("INFO"):
        assert top_classes("auto") == top_classes("original") != top_classes("hand_crop")
    # The tree's gestures (call, like) are not the run's: no agreement to count, and the line says why.
    assert "the top class is the annotated one" not in caplog.text
    assert "(4 annotated with gestures the run was not trained on)" in caplog.text
    # The sheet frames each input green where its top class is the annotated one, red where not.
    sheet = np.asarray(Image.open(tmp_path / "auto" / "predictions.png").convert("RGB"))
    rows = [json.loads(line) for line in (tmp_path / "auto" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(row["annotation"] for row in rows)
    for k, row in enumerate(rows):
        corner = sheet[(k // 6) * (140 + 3 * 12 + 4) + 3, (k % 6) * 140 + 3]
        right = row["top_k"][0]["class"] == row["annotation"]
        assert tuple(corner) == ((0, 150, 0) if right else (200, 0, 0)), (k, row)


def test_predict_warns_of_centre_crops_for_a_hand_crop_run_of_tiny_inputs_and_of_flat_ones(run_dir, tmp_path,
                                                                                         caplog, monkeypatch):
    """Each counted among the inputs predicted: a file that does not decode was neither cropped nor enlarged."""
    workdir, root, _ = run_dir
    monkeypatch.setattr(resume_check, "recorded_view", lambda _: "hand_crop")  # a run evaluated on hand crops
    inputs_dir = tmp_path / "inputs"
    inputs_dir.mkdir()
    shutil.copy(next((root / "val" / CLASSES[0]).iterdir()), inputs_dir / "photo.jpg")  # 32 px: the model's size
    Image.new("RGB", (3, 2), (200, 150, 120)).save(inputs_dir / "thumbnail.png")
    Image.new("RGB", (400, 40), (90, 150, 120)).save(inputs_dir / "strip.png")  # its centre crop: 8 % of it
    (inputs_dir / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(inputs_dir))
    with caplog.at_level("WARNING"):
        assert stages.run(config, str(tmp_path / "out")) == {"predicted": 3, "skipped": 1}
    assert ("the run was evaluated on hand crops, and 3 input(s) have no gesture box: those were centre-cropped "
            "instead") in caplog.text
    assert (f"1 input(s) are far from square: the model saw only their centre crop (e.g. {inputs_dir}/strip.png, "
            "10.0:1: 8 % of it); a hand off-centre is not in it: crop such images around the hand first"
            ) in caplog.text
    enlargement = 32 / (2 * views.EVAL_CROP_FRACTION)
    assert (f"1 input(s) are so small that the model saw them enlarged more than 4x (e.g. {inputs_dir}/thumbnail.png, "
            f"3x2 px, {enlargement:.0f}x for the model's 32 px)") in caplog.text


@pytest.mark.slow
def test_predict_lists_odd_folder_entries_once_each_and_writes_every_name(run_dir, tmp_path):
    workdir, root, _ = run_dir
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = next((root / "val" / "palm").iterdir())
    shutil.copy(image, inputs / "a.jpg")
    Image.open(image).save(inputs / "scan.bmp")
    os.symlink(".", inputs / "self")  # a loop: the folder inside itself
    (inputs / "empty.jpg").write_bytes(b"")
    (inputs / "junk.jpg").write_text("not an image")
    os.mkfifo(inputs / "pipe.jpg")  # reading it would wait for a writer forever
    with open(os.path.join(os.fsencode(inputs), b"bad\xffname.jpg"), "wb") as f:  # not UTF-8
        f.write(image.read_bytes())
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(inputs))
    out = tmp_path / "out"
    assert stages.run(config, str(out)) == {"predicted": 3, "skipped": 4}

    with open(out / "predictions.csv") as f:
        predicted = [row["file"] for row in csv.DictReader(f)]
    assert predicted == [str(inputs / name) for name in ("a.jpg", "bad\\xffname.jpg", "scan.bmp")]
    assert [json.loads(line)["file"] for line in (out / "predictions.jsonl").read_text().splitlines()] == predicted
    with open(out / "skipped.csv") as f:
        skipped = {row["file"]: row["reason"] for row in csv.DictReader(f)}
    assert skipped == {
        str(inputs / "empty.jpg"): f"unreadable: Cannot decode image {inputs / 'empty.jpg'}: the file is empty",
        str(inputs / "junk.jpg"): f"unreadable: Cannot decode image {inputs / 'junk.jpg'}: not an image PIL can read",
        str(inputs / "pipe.jpg"): "not a regular file",
        str(inputs / "self"): f"the same folder as {inputs}, listed there",
    }


@pytest.mark.parametrize("inside", ["", "predictions"])
def test_a_predict_workdir_inside_its_inputs_is_refused_before_anything_is_written(run_dir, tmp_path, inside):
    """A second run there predicted the first one's predictions.png as a gesture image."""
    inputs = tmp_path / "photos"
    shutil.copytree(run_dir[1] / "val", inputs)
    config = load("predict")
    config.update(checkpoint_dir=run_dir[0], inputs=str(inputs))
    workdir = inputs / inside if inside else inputs
    with pytest.raises(config_lib.ConfigError, match=rf"--workdir={workdir} is inside config.inputs={inputs}, whose "
                       "images the run reads: its files would mix with them"):
        stages.run(config, str(workdir))
    assert not list(inputs.glob("predictions*")) and not list(inputs.glob(".*"))


def test_predict_of_inputs_none_of_which_reads_is_an_error_with_the_reasons_written(run_dir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "empty.jpg").write_bytes(b"")
    (inputs / "junk.png").write_text("not an image")
    config = load("predict")
    config.update(checkpoint_dir=run_dir[0], inputs=str(inputs))
    (tmp_path / "out").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "out" / "predictions.png")  # an earlier run's sheet
    with pytest.raises(config_lib.ConfigError, match=rf"none of the 2 image file\(s\) in config.inputs={inputs} "
                       rf"could be read; {tmp_path / 'out'}/skipped.csv says why for each"):
        stages.run(config, str(tmp_path / "out"))
    with open(tmp_path / "out" / "skipped.csv") as f:
        assert [row["file"] for row in csv.DictReader(f)] == [str(inputs / "empty.jpg"), str(inputs / "junk.png")]
    assert not (tmp_path / "out" / "predictions.png").exists()  # it described other inputs


@pytest.mark.slow
def test_predict_writes_the_reason_of_a_skipped_file_whose_name_is_not_utf8(run_dir, tmp_path):
    workdir, root, _ = run_dir
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(next((root / "val" / "palm").iterdir()), inputs / "a.jpg")
    open(os.path.join(os.fsencode(inputs), b"bad\xffname.jpg"), "wb").close()  # its reason quotes the name
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(inputs))
    out = tmp_path / "out"
    assert stages.run(config, str(out)) == {"predicted": 1, "skipped": 1}

    with open(out / "skipped.csv") as f:
        skipped = list(csv.DictReader(f))
    name = str(inputs / "bad\\xffname.jpg")
    assert skipped == [{"file": name, "reason": f"unreadable: Cannot decode image {name}: the file is empty"}]


def test_a_folder_predict_cannot_list_is_skipped_with_the_reason(tmp_path, monkeypatch):
    """It stopped the whole listing (as root, permissions are not enforced: the refusal is simulated)."""
    for folder in ("a", "locked"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "hand.jpg").write_bytes(b"")
    real_iterdir = type(inputs.epath.Path(tmp_path)).iterdir

    def iterdir(self):
        if self.name == "locked":
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(type(inputs.epath.Path(tmp_path)), "iterdir", iterdir)
    items, skipped = inputs.list_inputs(str(tmp_path))
    assert [item.path for item in items] == [str(tmp_path / "a" / "hand.jpg")]
    assert skipped == [(str(tmp_path / "locked"), "cannot list this folder (Permission denied)")]


def test_a_link_beside_a_folder_lists_its_files_under_the_folders_own_name(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "hand.jpg").write_bytes(b"")
    os.symlink("real", tmp_path / "a_link")  # first in name order
    items, skipped = inputs.list_inputs(str(tmp_path))
    assert [item.path for item in items] == [str(tmp_path / "real" / "hand.jpg")]
    assert skipped == [(str(tmp_path / "a_link"), f"the same folder as {tmp_path / 'real'}, listed there")]


@pytest.mark.parametrize("where", ["images", "class", "above"])
def test_a_folder_one_level_off_a_hagrid_tree_is_read_with_a_warning_naming_the_tree(tmp_path, where, caplog):
    """Read as a plain folder, a hand-crop run's inputs were all centre-cropped without a word."""
    tree = fx.make_tree(tmp_path / "hagrid", "v2", classes=("call", "like"), num_users=2, images_per_user=1)
    inputs_path = {"images": tree.root / "hagrid_dataset", "class": tree.root / "hagrid_dataset" / "call",
                   "above": tmp_path}[where]
    with caplog.at_level("WARNING"):
        items, _ = inputs.list_inputs(str(inputs_path), ["call", "like"])
    assert items and all(item.box is None for item in items)
    assert (f"config.inputs={inputs_path} is {'one level above' if where == 'above' else 'in'} the HaGRID tree "
            f"{tree.root}; read as a plain folder") in caplog.text
    assert f"--config.inputs={tree.root} reads them with theirs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        call = tree.root / "hagrid_dataset" / "call"
        inputs.list_inputs(str(call / os.listdir(call)[0]))
        inputs.list_inputs(str(tree.root))
    assert "HaGRID tree" not in caplog.text  # one image, or the tree itself


def test_a_link_to_nothing_is_skipped_naming_where_it_points(tmp_path):
    (tmp_path / "hand.jpg").write_bytes(b"")
    os.symlink("moved/palm.jpg", tmp_path / "palm.jpg")
    items, skipped = inputs.list_inputs(str(tmp_path))
    assert [item.path for item in items] == [str(tmp_path / "hand.jpg")]
    assert skipped == [(str(tmp_path / "palm.jpg"), "a link to moved/palm.jpg, which does not exist")]


def test_predict_counts_decoding_threads_as_the_input_pipeline_counts_workers(monkeypatch):
    from gmae_jax import host_resources
    monkeypatch.setattr(host_resources, "usable_cores", lambda: 6)
    assert [host_resources.pool_size(n) for n in (-1, 0, 1, 3)] == [6, 1, 1, 3]  # predict's -1 gave one thread


def test_predict_refuses_inputs_it_cannot_use_before_reading_the_run(run_dir, tmp_path):
    workdir, root, _ = run_dir
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(config_lib.ConfigError, match="holds no image to predict"):
        stages.run(config, str(tmp_path / "out"))
    config.update(inputs=str(root / "val"), view="hand_crop")
    with pytest.raises(config_lib.ConfigError, match="config.view=hand_crop needs a HaGRID tree"):
        stages.run(config, str(tmp_path / "out"))
    config.update(view="auto")
    with pytest.raises(config_lib.ConfigError, match="is inside the run it reads .*; predict never writes into"):
        stages.run(config, os.path.join(workdir, "predictions"))
    assert not (tmp_path / "out").exists() and not os.path.exists(os.path.join(workdir, "predictions"))
    (tmp_path / "taken" / "skipped.csv").mkdir(parents=True)  # failed after every image was predicted
    with pytest.raises(config_lib.ConfigError, match=r"taken/skipped.csv is a folder, where predict writes a file"):
        stages.run(config, str(tmp_path / "taken"))


def test_predict_refuses_a_pretraining_run(tmp_path):
    run = tmp_path / "pretrain"
    run.mkdir()
    (run / "config.json").write_text(load("pretrain", "runlocal").to_json())
    (run / "classes.json").write_text("[]")
    config = load("predict")
    config.update(checkpoint_dir=str(run), inputs=str(run / "classes.json"))
    with pytest.raises(config_lib.ConfigError, match="is a 'pretrain' run; predict needs a finetune run"):
        stages.run(config, str(tmp_path / "out"))


def read_events(folder):
    """{tag: [(step, value or decoded image)]} of the event files in `folder`, read back with
    TensorBoard's own reader (`EventAccumulator`, the `dev` extra)."""
    from tensorboard.backend.event_processing import event_accumulator

    reader = event_accumulator.EventAccumulator(folder, size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    found = {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}
    for tag in reader.Tags()["images"]:
        found[tag] = [(e.step, Image.open(io.BytesIO(e.encoded_image_string))) for e in reader.Images(tag)]
    return found


@pytest.mark.slow
def test_tensorboard_files_hold_the_logged_scalars_and_pictures(run_dir):
    workdir, _, trained = run_dir
    history = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = read_events(os.path.join(workdir, "tensorboard", "train"))
    logged = [(r["step"], r["loss"]) for r in history if r["split"] == "train"]
    assert [(s, pytest.approx(v)) for s, v in train["loss"]] == logged
    val = read_events(os.path.join(workdir, "tensorboard", "val"))
    assert val["accuracy"][-1] == (4, pytest.approx(trained["accuracy"]))
    assert "recall/palm" in val and "macro_f1" in val
    step, picture = val["confusion_matrix"][-1]
    assert step == 4 and picture.size == Image.open(os.path.join(workdir, "confusion_matrix.png")).size


def test_a_resumed_run_purges_what_a_crashed_attempt_logged_beyond_its_checkpoint(tmp_path):
    """After a kill -9 at step 6 with step 3 saved, the rerun logs 4-6 again: TensorBoard must show them once."""
    crashed = Summaries(str(tmp_path))
    for step in range(1, 7):
        crashed.scalars("train", step, {"loss": float(step)})
    crashed.close()
    time.sleep(1.1)  # event files are named by the second they start in; a rerun starts later than that
    resumed = Summaries(str(tmp_path), resumed_at=3)
    for step in range(4, 9):
        resumed.scalars("train", step, {"loss": 10.0 + step})
    resumed.close()

    assert read_events(str(tmp_path / "tensorboard" / "train"))["loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0), (6, 16.0), (7, 17.0), (8, 18.0)]


def test_wandb_receives_scalars_when_enabled(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", dict(values), step))

        def finish(self):
            calls.append(("finish",))

    fake = types.SimpleNamespace(init=lambda **kwargs: calls.append(("init", kwargs)) or FakeRun(),
                                 Image=lambda pixels: ("image", pixels.shape))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    summaries = Summaries(str(tmp_path), schema.WandbConfig(enabled=True, mode="offline"), {"seed": 1}, "run")
    summaries.scalars("val", 7, {"accuracy": 0.5, "note": "text is not a scalar"})
    summaries.close()
    assert calls[0][0] == "init" and calls[0][1]["mode"] == "offline" and calls[0][1]["config"] == {"seed": 1}
    assert calls[1:] == [("log", {"val/accuracy": 0.5}, 7), ("finish",)]
    assert read_events(str(tmp_path / "tensorboard" / "val"))["accuracy"] == [(7, 0.5)]
    # A resume logs to the same W&B run: resume='allow' continues one only under its id.
    Summaries(str(tmp_path), schema.WandbConfig(enabled=True, mode="offline"), {"seed": 1}, "run").close()
    first_id, resumed_id = (call[1]["id"] for call in calls if call[0] == "init")
    assert first_id == resumed_id == (tmp_path / "wandb_run_id.txt").read_text() and calls[0][1]["resume"] == "allow"


def test_tensorboard_summaries_leave_torch_unloaded_and_importable(tmp_path):
    """tensorboardX would import torch (seconds of every run's start) to accept tensors we never pass."""
    script = textwrap.dedent(f"""
        import sys
        from gmae_jax import schema
        from gmae_jax.train.summaries import Summaries
        summaries = Summaries({str(tmp_path)!r}, schema.WandbConfig(), {{}}, "run")
        summaries.scalars("val", 3, {{"accuracy": 0.25}})
        summaries.close()
        print("torch loaded:", "torch" in sys.modules)
        import torch
        print("torch importable:", torch.ones(2).sum().item() == 2)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.stdout.splitlines() == ["torch loaded: False", "torch importable: True"], done.stderr[-3000:]
    assert read_events(str(tmp_path / "tensorboard" / "val"))["accuracy"] == [(3, 0.25)]


def test_wandb_enabled_without_the_package_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(config_lib.ConfigError, match="config.wandb.enabled=True but the wandb package"):
        Summaries(str(tmp_path), schema.WandbConfig(enabled=True))
    config = load("pretrain", "runlocal")
    config.data.root, config.wandb.enabled = str(tmp_path), True
    with pytest.raises(config_lib.ConfigError, match="config.wandb.enabled=True but the wandb package"):
        stages.validate(config)  # before the run folder is written
    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    config.wandb.mode = "bogus"
    with pytest.raises(config_lib.ConfigError, match=r"config.wandb.mode='bogus' must be one of \('online'"):
        stages.validate(config)


def test_a_hagrid_tree_gives_inputs_of_the_runs_own_classes_too(run_dir, tmp_path, monkeypatch):
    """A run fine-tuned with data.classes=present on gestures HaGRID does not name: predicting on such
    a tree skipped every image of them as 'unknown_class'."""
    tree = fx.make_tree(tmp_path / "hagrid", "v2", classes=("waving", "call"), num_users=3, images_per_user=1)
    skipped = dict(inputs.list_inputs(str(tree.root))[1])
    assert {skipped[str(p)] for p in (tree.images_root / "waving").glob("*.jpg")} == {"unknown_class"}
    items, _ = inputs.list_inputs(str(tree.root), ["waving", "call"])
    assert sorted(i.annotation for i in items) == ["call"] * 3 + ["waving"] * 3
    # The predict stage lists its inputs with the run's classes.
    asked = []
    monkeypatch.setattr(inputs, "list_inputs", lambda path, classes=(): asked.append(classes) or ([], []))
    workdir, _, _ = run_dir
    config = load("predict")
    config.update(checkpoint_dir=workdir, inputs=str(tree.root))
    with pytest.raises(config_lib.ConfigError, match="holds no image to predict"):
        stages.run(config, str(tmp_path / "out"))
    assert asked == [run_folder.load_class_names(workdir)]


@pytest.mark.parametrize("folder", ["hagrid", "shoot: day 1"])  # a path may hold the report's ': ' itself
def test_a_hagrid_tree_gives_one_hand_crop_input_per_annotated_image(tmp_path, folder):
    tmp_path = tmp_path / folder
    tree = fx.make_tree(tmp_path, "v2", classes=("call", "like"), num_users=3, images_per_user=1)
    fx.write_image(tree.images_root / "like" / "unlisted.jpg")
    (tree.images_root / "call" / "notes.txt").write_text("x")
    fx.inject_boxes(tree, "train", "call", "nobox", [], [])
    fx.inject_boxes(tree, "train", "call", "zerobox", [[0.5, 0.5, 0, 0]], ["call"])
    fx.inject_boxes(tree, "train", "like", "odd", [[0.1, 0.1, 0.2, 0.2]], ["wave"])
    fx.inject_unknown_class_folder(tree)
    items, skipped = inputs.list_inputs(str(tmp_path))
    images = sorted(str(p) for p in tree.images_root.rglob("*.jpg"))
    # Every image once: an input, or skipped with its reason.
    assert sorted([i.path for i in items] + [f for f, _ in skipped if f.endswith(".jpg")]) == images
    assert len(items) == 6 and all(i.box is not None and i.annotation in ("call", "like") for i in items)
    reasons = dict(skipped)
    assert reasons[str(tree.images_root / "like" / "unlisted.jpg")] == "unannotated"
    assert reasons[str(tree.images_root / "call" / "nobox.jpg")] == "empty_bboxes"
    assert reasons[str(tree.images_root / "call" / "zerobox.jpg")] == "empty_bboxes"
    assert reasons[str(tree.images_root / "like" / "odd.jpg")] == "unknown_label (['wave'])"
    assert {reasons[name] for name in images if "/call/" not in name and "/like/" not in name} == {"unknown_class"}
    assert str(tree.images_root / "call" / "notes.txt") in reasons
    assert all(os.path.exists(name) for name in reasons)  # no part of a name taken for a file
    pixels = views.predict_view(items[0].path, "hand_crop", 32, items[0].box).pixels
    assert pixels.shape == (32, 32, 3) and pixels.std() > 0


def test_readme_places_every_module_and_every_placed_file_exists():
    text = open(os.path.join(REPO, "README.md")).read()
    block = text.split("## Where things live", 1)[1].split("\n## ", 1)[0]
    mentioned = set(re.findall(r"([\w]+\.py)\b", block))
    modules = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "gmae_jax", "**", "*.py"), recursive=True)}
    assert modules - {"__init__.py"} <= mentioned, "modules missing from the README's 'Where things live'"
    assert mentioned - {"__init__.py"} <= modules, "the README names files that do not exist"
    assert set(re.findall(r"(?m)^configs/ .*: (.*)$", block)[0].split(", ")) == set(stages.STAGES)


@pytest.mark.parametrize("name", ["prepare", "predict", "export", "import", "demo"])
def test_one_process_stages_refuse_a_multi_process_job_before_writing(name, tmp_path, monkeypatch):
    """Every process of a job would write the same files (the prepare stage's shards collided)."""
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(config_lib.ConfigError, match=f"the {name} stage runs in one process: run python -m "
                       "gmae_jax.main without --coordinator_address"):
        stages.run(load(name), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_a_one_process_stage_is_refused_before_the_job_forms(tmp_path):
    """Its processes joined the job (waiting for each other) only to be refused once it had formed."""
    result = subprocess.run(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/predict.py", f"--workdir={tmp_path / 'out'}",
         "--coordinator_address=127.0.0.1:9", "--num_processes=2", "--process_id=1", "--distributed_timeout=300"],
        cwd=REPO, capture_output=True, text=True, timeout=120)  # rank 0 never comes: a join would wait 300 s
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: the predict stage runs in one process: run "
                                                              "python -m gmae_jax.main without")
    assert not (tmp_path / "out").exists()


def test_training_stages_run_in_several_processes():
    assert not any(getattr(stages.get(name), "ONE_PROCESS", False)
                   for name in ("pretrain", "finetune", "evaluate", "study"))


def test_predictions_write_class_names_that_are_not_utf8(tmp_path):
    """A run trained on class folders takes its class names from folder names, which may hold bytes
    that are not UTF-8: predict wrote every prediction, then failed on its output files."""
    from gmae_jax.stages import predict
    odd = os.fsdecode(b"on\xffe")
    row = {"file": str(tmp_path / "a.jpg"), "annotation": odd,
           "top_k": [{"class": odd, "prob": 0.75}, {"class": "palm", "prob": 0.25}]}
    predict._write(tmp_path, [row], [], top_k=2, checkpoint={"run": "r", "step": 1})
    with open(tmp_path / "predictions.csv") as f:
        assert list(csv.reader(f))[1] == [str(tmp_path / "a.jpg"), "on\\xffe", "on\\xffe", "0.750000", "palm",
                                          "0.250000", "r", "1"]
    assert json.loads((tmp_path / "predictions.jsonl").read_text())["top_k"][0]["class"] == "on\\xffe"


def test_the_run_summary_says_which_step_its_pictures_show():
    """Beside the best checkpoint's score, pictures of the final model must say they are not the best's."""
    from gmae_jax.train.summaries import run_summary

    manager = types.SimpleNamespace(best_step=lambda: 10, latest_step=lambda: 20, all_steps=lambda: [10, 20],
                                    metrics=lambda step: {"accuracy": 0.5}, directory="run/checkpoints")
    lines = run_summary("finetune", "run", manager, "accuracy", ["run/confusion_matrix.png"]).splitlines()
    assert lines[1] == "best accuracy: 0.5000 at step 10"
    assert lines[3] == ("pictures (the final model, step 20; the best checkpoint is step 10: configs/evaluate.py with "
                        "--config.checkpoint=best draws its own): run/confusion_matrix.png")
    manager.best_step = lambda: 20
    assert "pictures (the final model, step 20): run/confusion_matrix.png" in run_summary(
        "finetune", "run", manager, "accuracy", ["run/confusion_matrix.png"])
    # A rerun of a finished run evaluates it again, on the data as it is now: said beside training's best.
    lines = run_summary("finetune", "run", manager, "accuracy", [], again={"loss": 1.0, "accuracy": 0.5556})
    assert lines.splitlines()[1:3] == [
        "best accuracy: 0.5000 at step 20",
        "evaluated again by this rerun (the run was finished): accuracy 0.5556 at step 20; metrics.jsonl and the best "
        "checkpoint keep training's evaluations"]
