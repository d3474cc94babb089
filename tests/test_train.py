"""Training end to end on the demo data: loss goes down, fine-tuning starts from the pretrained
encoder, a killed run resumes to exactly the straight run, divergence stops with a clear error."""

import dataclasses
import functools
import glob
import json
import logging
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import hagrid_fixtures as fx
import jax
import numpy as np
import pytest
from PIL import Image

import saved_weights
from gmae_jax import config_lib, stages, user_errors, workdir_lock
from gmae_jax.data import input_workers, synthetic
from gmae_jax.stages import evaluate as evaluate_stage
from gmae_jax.stages import finetune as finetune_stage
from gmae_jax.stages import pretrain as pretrain_stage
from gmae_jax.train import (checkpoint, divergence, evaluation, init_from, progress, run_folder, setup, sharding,
                            start_warnings, summaries, trainer)

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def stage_config(stage: str, root: str, **overrides):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), stage, "runlocal")
    config.data.root = root
    config.batch_size = 32
    config.optim.update(lr=2e-3, warmup_steps=3)
    config.model.depth = 1  # one block of each kind: every code path, a fifth less to compile
    for key, value in overrides.items():
        section, _, name = key.rpartition("__")
        (config[section] if section else config)[name] = value
    return config


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demo"))
    synthetic.write_demo_dataset(root, image_size=32, train_per_class=16, val_per_class=4,
                                 classes=("fist", "one", "peace", "palm"))
    return root


@pytest.fixture(scope="module")
def pretrained(demo_root, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = stage_config("pretrain", demo_root, total_steps=30, log_every=3, eval_every=0, checkpoint_every=30)
    metrics = pretrain_stage.run(config, workdir)
    return workdir, config, metrics


def read_metrics(workdir):
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_pretraining_loss_decreases_on_demo_data(pretrained):
    workdir, _, final = pretrained
    train = [r for r in read_metrics(workdir) if r["split"] == "train"]
    assert len(train) == 10
    first, last = np.mean([r["loss"] for r in train[:2]]), np.mean([r["loss"] for r in train[-2:]])
    assert last < 0.8 * first, (first, last)
    assert all(r["img_per_sec"] > 0 and "eta_sec" in r and "lr" in r and 0 <= r["input_wait"] <= 1 for r in train)
    assert np.isfinite(final["loss"])
    # 8 rows of original | masked input | reconstruction | visible patches pasted back, 32 px + 2 px gaps, x4,
    # column names above, the caption (step, mask ratio) below in as many lines as it takes.
    picture = Image.open(os.path.join(workdir, "reconstructions.png"))
    assert picture.width == (4 * 34 + 2) * 4 and (picture.height - (8 * 34 + 2) * 4) % 16 == 0
    assert picture.height > (8 * 34 + 2) * 4 + 16
    assert len(np.unique(np.asarray(picture.convert("L")))) > 16  # not blank


def test_finetune_starts_from_pretrained_encoder(pretrained, demo_root):
    workdir, _, _ = pretrained
    config = stage_config("finetune", demo_root, num_classes=4, init_from=os.path.join(workdir, "checkpoints"))
    model, init_inputs = setup.build_model(config)
    mesh = sharding.make_mesh()
    state, _ = trainer.create_state(model, init_inputs, config, mesh, 10)
    fresh_head = jax.device_get(state.params["head"])
    loaded = init_from.load_pretrained_encoder(state, config.init_from)
    saved = saved_weights.restore_params(config.init_from)
    for got, want in zip(jax.tree.leaves(jax.device_get(loaded.params["encoder"])),
                         jax.tree.leaves(saved["params"]["encoder"])):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(loaded.params["pos_embed"], saved["params"]["pos_embed"])
    for got, want in zip(jax.tree.leaves(jax.device_get(loaded.batch_stats["encoder"])),
                         jax.tree.leaves(saved["batch_stats"]["encoder"])):
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(jax.device_get(state.params["pos_embed"]), saved["params"]["pos_embed"])
    np.testing.assert_array_equal(jax.device_get(loaded.params["head"]["kernel"]), fresh_head["kernel"])


def test_finetune_rejects_an_encoder_of_another_size(pretrained, demo_root):
    workdir, _, _ = pretrained
    config = stage_config("finetune", demo_root, num_classes=4, init_from=os.path.join(workdir, "checkpoints"))
    config.model.depth = 3
    model, init_inputs = setup.build_model(config)
    state, _ = trainer.create_state(model, init_inputs, config, sharding.make_mesh(), 10)
    with pytest.raises(config_lib.ConfigError, match=r"does not match config.model \(model.depth: 1 there, 3 here\); "
                       rf"use the same --config.model.\* as that run \(its config.json is in {workdir}\)"):
        init_from.load_pretrained_encoder(state, workdir, model.config)
    # Without this run's config, the first parameters that differ.
    with pytest.raises(config_lib.ConfigError, match=r"/blocks_1/\S*: absent there, \(\d+,?\d*\) here; "):
        init_from.load_pretrained_encoder(state, workdir)


def test_finetune_rejects_an_encoder_with_other_heads_though_its_shapes_fit(pretrained, demo_root):
    """The weights loaded and were split into other heads than those they were trained with."""
    workdir, _, _ = pretrained
    config = stage_config("finetune", demo_root, num_classes=4, init_from=workdir)
    trained_with = setup.restore_run(workdir).model.config.num_heads
    config.model.num_heads = trained_with // 2
    model, init_inputs = setup.build_model(config)
    state, _ = trainer.create_state(model, init_inputs, config, sharding.make_mesh(), 10)
    with pytest.raises(config_lib.ConfigError, match=rf"\(model.num_heads: {trained_with} there, {trained_with // 2} "
                       r"here\); use the same --config.model.\* as that run"):
        init_from.load_pretrained_encoder(state, workdir, model.config)


def test_a_finetune_whose_init_from_does_not_load_leaves_no_checkpoints_folder(pretrained, demo_root, tmp_path):
    workdir, _, _ = pretrained
    config = stage_config("finetune", demo_root, num_classes=4, total_steps=2, init_from=workdir)
    config.model.depth = 3
    with pytest.raises(config_lib.ConfigError, match="does not match config.model"):
        finetune_stage.run(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "checkpoints")  # so the folder is no run that evaluate would refuse


def test_runs_and_checkpoints_named_by_relative_paths(pretrained, demo_root, monkeypatch):
    """The README's commands name workdirs relative to where they run; orbax wants absolute paths."""
    workdir, _, _ = pretrained
    monkeypatch.chdir(os.path.dirname(workdir))
    run = setup.restore_run(os.path.basename(workdir))
    assert run.step == 30
    manager = checkpoint.make_manager(os.path.join("relative", "checkpoints"), max_to_keep=1)
    checkpoint.save(manager, 7, {"w": np.arange(3.0)}, None)
    manager.wait_until_finished()
    restored = checkpoint.restore(manager, {"w": np.zeros(3)}, None)
    manager.close()
    np.testing.assert_array_equal(restored["w"], np.arange(3.0))
    assert os.path.isdir(os.path.join("relative", "checkpoints", "7"))


def files_of(folder):
    """Every file under `folder` with its bytes."""
    found = {}
    for path in glob.glob(os.path.join(folder, "**", "*"), recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


def test_rerun_with_another_model_is_refused_before_anything_changes(pretrained, demo_root):
    workdir, config, _ = pretrained
    before = files_of(workdir)
    changed = config.copy_and_resolve_references()
    changed.model.embed_dim = 48
    changed.total_steps = 40  # harmless on its own; not recorded, as the run does not go ahead
    with pytest.raises(config_lib.ConfigError) as refused:
        stages.run(changed, workdir)
    assert str(refused.value) == (
        f"{workdir} holds a run with other settings (model.embed_dim: 32 -> 48); nothing was changed. "
        "model.embed_dim fixes its saved state (its weights' shapes, their attention heads, what a classifier's "
        "outputs mean, or how its optimiser state is laid out), so no resume can continue it with the new values: "
        "start a new run with another --workdir")
    after = files_of(workdir)
    assert after == before  # config.json, classes.json, every checkpoint file: byte-identical
    assert any(name.startswith("checkpoints" + os.sep) for name in after)


def test_a_rerun_of_a_finished_run_logs_its_evaluation_and_draws_missing_pictures(pretrained, tmp_path, caplog,
                                                                                 capsys):
    """The rerun said it evaluated the run, then showed nothing; pictures lost since (a failed draw,
    a deleted file) stayed lost."""
    workdir, config, final = pretrained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    pictures = sorted(copy.glob("*.png"))
    assert pictures
    for picture in pictures:
        picture.unlink()
    metrics_before = (copy / "metrics.jsonl").read_text()
    with caplog.at_level("INFO"):
        again = pretrain_stage.run(config, str(copy))
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert re.search(rf"\[pretrain\] step 30 eval \(the finished run evaluated again\): loss {final['loss']:.4f}",
                     caplog.text)
    assert sorted(copy.glob("*.png")) == pictures
    out = capsys.readouterr().out
    assert "pictures (the final model, step 30" in out
    assert f"evaluated again by this rerun (the run was finished): loss {final['loss']:.4f} at step 30" in out
    assert (copy / "metrics.jsonl").read_text() == metrics_before


def test_a_picture_that_cannot_be_written_is_a_warning_not_a_failed_run(pretrained, tmp_path, caplog, monkeypatch):
    """Pictures come after the last checkpoint: a rerun draws them again. A full disk (or a folder put
    in a picture's place during the run) failed the run with a traceback, and in a job took the other
    processes down with it."""
    from gmae_jax import visualize

    def disk_full(image, path):
        raise OSError(28, "No space left on device", str(path))

    workdir, config, final = pretrained
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    monkeypatch.setattr(visualize, "save_png", disk_full)
    with caplog.at_level("WARNING"):
        again = pretrain_stage.run(config, str(copy))
    assert again["loss"] == pytest.approx(final["loss"], rel=1e-5)
    assert re.search(r"could not write the run's pictures \(OSError: .*No space left on device.*\); rerunning the "
                     r"same command draws them again", caplog.text)


def test_finetune_rejects_wrong_num_classes(demo_root):
    with pytest.raises(config_lib.ConfigError, match="num_classes=18 but the data in .* has 4 classes"):
        finetune_stage.open_data(stage_config("finetune", demo_root, num_classes=18))


@pytest.mark.slow
def test_a_classifier_learns_its_training_images(demo_root, tmp_path, caplog):
    """Every other fine-tuning test checks plumbing (metrics written, resume = straight run): this one
    fails if the classifier does not learn, e.g. a head or a gradient that never reaches the weights.
    64 images without augmentation, scored on themselves after 30 steps: chance is 0.25."""
    config = stage_config("finetune", demo_root, num_classes=4, total_steps=30, eval_every=0, checkpoint_every=30,
                          optim__lr=5e-3, data__eval_split="train", data__num_workers=0)
    config.data.aug.update(crop_scale_min=1.0, hflip=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    with caplog.at_level("WARNING"):
        metrics = finetune_stage.run(config, str(tmp_path))
    # Wanted here; said, as it would be where it is not.
    assert ("config.data.eval_split='train' is the training split: every evaluation, and the checkpoint kept as best "
            "(by its accuracy), is scored on the images the model trains on") in caplog.text
    train = [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert train[-1]["loss"] < 0.85 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert metrics["accuracy"] >= 0.5, metrics["accuracy"]


@pytest.mark.slow
def test_finetune_then_evaluate_writes_accuracy_and_confusion_matrix(pretrained, demo_root, tmp_path, caplog):
    workdir, _, _ = pretrained
    finetune_dir, eval_dir = str(tmp_path / "finetune"), str(tmp_path / "eval")
    shutil.copytree(workdir, tmp_path / "pretrain")
    config = stage_config("finetune", demo_root, num_classes=4, total_steps=6, eval_every=0,
                          checkpoint_every=6, init_from=str(tmp_path / "pretrain" / "checkpoints"))
    metrics = finetune_stage.run(config, finetune_dir)
    assert 0.0 <= metrics["accuracy"] <= 1.0 and "recall/palm" in metrics and "macro_f1" in metrics
    # A rerun reads the run's own checkpoints, never init_from: the pretraining run may have gone since.
    shutil.rmtree(tmp_path / "pretrain")
    stages.validate(config)  # as the entry point does first
    assert finetune_stage.run(config, finetune_dir)["accuracy"] == metrics["accuracy"]
    evaluate = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "evaluate")
    evaluate.checkpoint_dir, evaluate.num_workers = finetune_dir, 0
    with caplog.at_level("INFO"):
        result = evaluate_stage.run(evaluate, eval_dir)
    assert f"wrote {os.path.join(eval_dir, 'eval_metrics.json')}, " in caplog.text  # then the pictures
    assert result["accuracy"] == pytest.approx(metrics["accuracy"])
    assert result["checkpoint_step"] == 6
    assert os.path.exists(os.path.join(eval_dir, "confusion_matrix.png"))
    assert os.path.exists(os.path.join(eval_dir, "eval_metrics.json"))
    for folder in (finetune_dir, eval_dir):  # the step of the weights each matrix counts
        assert json.load(open(os.path.join(folder, "confusion_matrix.json")))["step"] == 6
        assert Image.open(os.path.join(folder, "misclassified.png")).width > 0  # the run's last evaluation too


@pytest.mark.parametrize("inside", ["", "eval", os.path.join("checkpoints", "..", "eval")])
@pytest.mark.parametrize("named_as", ["", "checkpoints"])
def test_evaluate_refuses_to_write_into_the_run_it_reads(pretrained, inside, named_as):
    workdir, _, _ = pretrained
    before = files_of(workdir)
    evaluate = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "evaluate")
    evaluate.checkpoint_dir = os.path.join(workdir, named_as)
    with pytest.raises(config_lib.ConfigError, match=r"is inside the run it reads .*; evaluate never writes into"):
        evaluate_stage.run(evaluate, os.path.join(workdir, inside))
    assert files_of(workdir) == before


def test_evaluate_refuses_to_write_into_another_run(pretrained, tmp_path):
    workdir, _, _ = pretrained
    other = tmp_path / "other_run"
    (other / "checkpoints").mkdir(parents=True)
    (other / "config.json").write_text("{}")
    evaluate = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "evaluate")
    evaluate.checkpoint_dir = workdir
    with pytest.raises(config_lib.ConfigError, match=r"holds a training run \(its checkpoints/ is there\); "
                                                     "evaluate never writes into a run"):
        evaluate_stage.run(evaluate, str(other))
    assert files_of(str(other)) == {"config.json": b"{}"}


def test_evaluate_of_a_run_whose_data_root_is_elsewhere_asks_for_data_root(pretrained, tmp_path):
    workdir, _, _ = pretrained
    moved = tmp_path / "from_another_machine"
    shutil.copytree(workdir, moved)
    config = json.loads((moved / "config.json").read_text())
    config["data"]["root"] = "/data/on/the/training/host"
    (moved / "config.json").write_text(json.dumps(config))
    evaluate = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "evaluate")
    evaluate.checkpoint_dir = str(moved)
    with pytest.raises(config_lib.ConfigError, match=r"the run's data root /data/on/the/training/host \(its "
                       r"config.data.root\) is not a folder here; pass --config.data_root=FOLDER"):
        evaluate_stage.run(evaluate, str(tmp_path / "eval"))


RESUME_OVERRIDES = dict(total_steps=6, checkpoint_every=3, log_every=1, eval_every=0)


@pytest.fixture(scope="module")
def straight_run(demo_root, tmp_path_factory):
    """A 6-step run saved at steps 3 and 6, started through the stage registry (which locks the
    workdir). At its 4th batch a second run is started in the same workdir with another learning
    rate: (workdir, the second run's error or None)."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    second: list[Exception] = []
    real, calls = sharding.global_batch, []

    def second_run_starts_meanwhile(host_batch, mesh):
        calls.append(1)
        if len(calls) == 4:
            try:
                stages.run(stage_config("pretrain", demo_root, **RESUME_OVERRIDES, optim__lr=5e-3), workdir)
            except config_lib.ConfigError as error:
                second.append(error)
        return real(host_batch, mesh)

    # The first TensorBoard write of the run takes 1000 s on the progress clock (opening files can be
    # slow on network disks): no img/s line may count it (test_img_per_sec_leaves_out_the_log_writes).
    clock_offset, real_scalars = [0.0], summaries.Summaries.scalars

    def slow_first_write(self, split, step, metrics):
        if step == 1:
            clock_offset[0] += 1000.0
        return real_scalars(self, split, step, metrics)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding, "global_batch", second_run_starts_meanwhile)
        patch.setattr(summaries.Summaries, "scalars", slow_first_write)
        patch.setattr(progress.time, "perf_counter", lambda real=time.perf_counter: real() + clock_offset[0])
        stages.run(stage_config("pretrain", demo_root, **RESUME_OVERRIDES), workdir)
    return workdir, (second[0] if second else None)


def test_img_per_sec_leaves_out_the_log_writes(straight_run):
    workdir, _ = straight_run
    lines = [r for r in read_metrics(workdir) if r["split"] == "train" and "img_per_sec" in r]
    assert [r["step"] for r in lines] == [2, 3, 4, 5, 6]  # step 1 (the compile) is logged apart
    assert min(r["img_per_sec"] for r in lines) > 32 / 100  # 32 images in far less than 100 s


@pytest.mark.slow
def test_a_second_run_in_a_busy_workdir_is_refused_and_the_first_finishes_intact(straight_run):
    workdir, second = straight_run
    assert isinstance(second, workdir_lock.WorkdirBusyError)
    assert re.fullmatch(rf"workdir {re.escape(workdir)} is in use by a running job \(host \S+, PID {os.getpid()}, "
                        r"since [0-9-]+ [0-9:]+ UTC\); wait for it to finish or stop it, or choose another --workdir",
                        str(second)), str(second)
    assert run_folder.load_run_config(workdir).optim.lr == 2e-3  # the first run's, not the second's
    records = read_metrics(workdir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6, 6]
    assert max(r["lr"] for r in records if r["split"] == "train") <= 2e-3 * (1 + 1e-6)  # none of the 5e-3 run
    assert saved_weights.restore_params(os.path.join(workdir, "checkpoints"))["step"] == 6
    assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))  # released at the end


def assert_same_final_run(straight_dir: str, resumed_dir: str) -> None:
    """Both runs end at step 6 with equal parameters, and logged the same training losses."""
    a = saved_weights.restore_params(os.path.join(straight_dir, "checkpoints"))
    b = saved_weights.restore_params(os.path.join(resumed_dir, "checkpoints"))
    assert a["step"] == b["step"] == 6
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(x, y)
    straight = [r["loss"] for r in read_metrics(straight_dir) if r["split"] == "train"]
    assert [r["loss"] for r in read_metrics(resumed_dir) if r["split"] == "train"] == straight


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_resumes_from_the_previous_one_to_the_straight_run(
        straight_run, demo_root, tmp_path, caplog):
    straight_dir, _ = straight_run
    damaged_dir = str(tmp_path / "damaged")
    shutil.copytree(straight_dir, damaged_dir)
    rng = np.random.default_rng(0)
    data_files = glob.glob(os.path.join(damaged_dir, "checkpoints", "6", "state", "**", "d", "*"), recursive=True)
    assert data_files
    for path in data_files:  # random bytes over the array data of the latest checkpoint
        size = os.path.getsize(path)
        with open(path, "wb") as f:
            f.write(rng.bytes(size))

    with caplog.at_level(logging.WARNING):
        pretrain_stage.run(stage_config("pretrain", demo_root, **RESUME_OVERRIDES), damaged_dir)
    assert "checkpoint step 6 in" in caplog.text and "could not be restored" in caplog.text
    assert "resuming from step 3" in caplog.text
    assert os.path.isdir(os.path.join(damaged_dir, checkpoint.DAMAGED, "6"))  # kept for a look, not deleted

    assert_same_final_run(straight_dir, damaged_dir)


def damaged_copy(straight_dir: str, folder: str, steps: tuple[int, ...], how: str) -> str:
    """A copy of the straight run whose checkpoint `steps` have their array data files truncated to
    half their size or deleted (`how`), as a full disk or a kill mid-copy leaves them, or hold step 3's
    arrays ('step 3'), which orbax restores as theirs."""
    shutil.copytree(straight_dir, folder)
    for step in steps:
        if how == "step 3":
            shutil.rmtree(os.path.join(folder, "checkpoints", str(step), "state"))
            shutil.copytree(os.path.join(folder, "checkpoints", "3", "state"),
                            os.path.join(folder, "checkpoints", str(step), "state"))
            continue
        if how == "metadata":  # what says which arrays the step holds
            for name in ("_METADATA", "manifest.ocdbt"):
                os.remove(os.path.join(folder, "checkpoints", str(step), "state", name))
            continue
        data_files = glob.glob(os.path.join(folder, "checkpoints", str(step), "state", "**", "d", "*"), recursive=True)
        assert data_files
        for path in data_files:
            if how == "delete":
                os.remove(path)
            else:
                os.truncate(path, os.path.getsize(path) // 2)
    return folder


def tree_of(folder: str) -> tuple[list[str], dict[str, bytes]]:
    """Every folder and every file with its bytes under `folder`: what a read-only stage must leave as it was."""
    folders = sorted(os.path.relpath(d, folder) for d, _, _ in os.walk(folder))
    return folders, files_of(folder)


@pytest.mark.slow
def test_a_config_json_that_does_not_describe_the_checkpoints_is_one_line_and_moves_nothing(
        straight_run, demo_root, tmp_path):
    edited = str(tmp_path / "edited")
    shutil.copytree(straight_run[0], edited)
    saved = json.loads((tmp_path / "edited" / "config.json").read_text())
    saved["model"]["depth"] = 2  # twice the encoder the checkpoints hold
    (tmp_path / "edited" / "config.json").write_text(json.dumps(saved))
    before = tree_of(edited)

    mismatch = (r"checkpoint step 6 in .* does not hold the model its run's config.json describes "
                r"\(batch_stats/encoder/blocks_1/\S+: absent saved, \(\d+,\) wanted; .*; and \d+ more\); was "
                r"config.json edited, or copied from another run\? Put back the one the run wrote$")
    with pytest.raises(checkpoint.SavedArraysMismatchError, match=mismatch):  # evaluate, predict, export
        setup.restore_run(edited)
    with pytest.raises(checkpoint.SavedArraysMismatchError, match=mismatch):  # resuming: not taken for damage
        stages.run(stage_config("pretrain", demo_root, **RESUME_OVERRIDES, model__depth=2), edited)
    assert tree_of(edited) == before  # no step set aside as damaged, nothing written

    # The other way round, a step holding more than the model described (a deeper encoder): orbax
    # would restore the part asked for without a word.
    config = run_folder.load_run_config(straight_run[0])
    model, init_inputs = setup.build_model(config)
    params = dict(setup.abstract_weights(model, init_inputs, setup.run_mesh(config)).params)
    params["encoder"] = {name: group for name, group in params["encoder"].items() if name != "blocks_0"}
    manager = setup.checkpoint_manager(straight_run[0], config)
    try:
        with pytest.raises(checkpoint.SavedArraysMismatchError,
                           match=r"\(params/encoder/blocks_0/\S+: \(\d+,?\s?\d*\) saved, absent wanted; "):
            checkpoint.check_saved_arrays(manager, 6, {"params": params})
    finally:
        manager.close()


@pytest.mark.slow
def test_a_pretraining_run_restores_without_its_classes_json(straight_run, tmp_path):
    copy = tmp_path / "copy"  # what someone copies to start fine-tunes from: config and checkpoints
    shutil.copytree(straight_run[0], copy, ignore=shutil.ignore_patterns(run_folder.CLASSES_FILE))

    restored = setup.restore_run(str(copy))

    assert restored.step == 6 and restored.class_names == []
    finetune = json.loads((copy / run_folder.CONFIG_FILE).read_text()) | {"stage": "finetune", "num_classes": 3}
    (copy / run_folder.CONFIG_FILE).write_text(json.dumps(finetune))
    with pytest.raises(config_lib.ConfigError, match="classes.json not found"):  # a classifier's names are needed
        setup.restore_run(str(copy))


@pytest.mark.slow
def test_the_last_step_is_saved_before_the_pictures_are_drawn(straight_run, demo_root, tmp_path, monkeypatch,
                                                              caplog):
    workdir = str(tmp_path / "longer")
    shutil.copytree(straight_run[0], workdir)
    real = trainer.tasks.make_task

    def failing_draw(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(trainer.tasks, "make_task", lambda *a: dataclasses.replace(real(*a), draw=failing_draw))
    with caplog.at_level("WARNING"):
        stages.run(stage_config("pretrain", demo_root, **{**RESUME_OVERRIDES, "total_steps": 7}), workdir)  # a warning
    assert run_folder.checkpoint_steps(workdir)[-1] == 7  # a rerun has nothing left to train, and draws them
    # Extended past its warm-up of 3 steps: the cosine decay from step 7 on is the 7-step run's.
    assert ("the learning-rate schedule now decays over 7 steps instead of 6: steps 7 on follow it, steps up to 6 "
            "followed the 6-step one") in caplog.text


def test_a_batch_beyond_the_hosts_memory_stops_before_anything_is_written(demo_root, tmp_path):
    """An extra zero or three in --config.batch_size allocated until the kernel killed the run."""
    config = stage_config("pretrain", demo_root, batch_size=8 * 10**8)  # divisible by the 8 test devices
    with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=800000000: one batch of 32 px images needs "
                                                     r"\d+ GiB of this host's memory, which has \d+ GiB"):
        stages.run(config, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name, kind", [("checkpoints", "file"), ("tensorboard", "file"), ("metrics.jsonl", "folder"),
                                        ("config.json", "folder"), ("reconstructions.png", "folder"),
                                        ("misclassified.png", "folder"), ("damaged_checkpoints", "file")])
def test_a_run_file_of_the_wrong_kind_stops_the_run_before_it_starts(tmp_path, name, kind):
    (tmp_path / name).mkdir() if kind == "folder" else (tmp_path / name).write_text("x")
    what = "a folder, where the run keeps a file" if kind == "folder" else "no folder, where the run keeps a folder"
    with pytest.raises(config_lib.ConfigError, match=re.escape(f"{tmp_path / name} is {what} of that name")):
        trainer.check_run_folder_kinds(str(tmp_path))


@pytest.mark.slow
def test_restore_run_latest_skips_a_damaged_newest_step_and_writes_nothing(straight_run, tmp_path, caplog):
    workdir = damaged_copy(straight_run[0], str(tmp_path / "run"), (6,), "truncate")
    os.mkdir(os.path.join(workdir, "checkpoints", "9"))  # a kill mid-save that left an empty step folder
    before = tree_of(workdir)
    with caplog.at_level(logging.WARNING):
        latest = setup.restore_run(workdir)
    assert latest.step == 3 and [step for step, _ in latest.skipped] == [9, 6]
    assert all(why for _, why in latest.skipped)
    for step in (9, 6):
        assert f"checkpoint step {step} in {workdir}/checkpoints could not be restored" in caplog.text
    notice = latest.skipped_notice()
    assert notice.startswith(f"notice: used checkpoint step 3 of {workdir}/checkpoints: the newer step(s) [9, 6] ")
    assert "\n" not in notice

    explicit = setup.restore_run(workdir, "3")
    assert explicit.step == 3 and explicit.skipped == () and explicit.skipped_notice() == ""
    assert int(latest.weights.step) == int(explicit.weights.step) == 3
    for got, want in zip(jax.tree.leaves((latest.weights.params, latest.weights.batch_stats)),
                         jax.tree.leaves((explicit.weights.params, explicit.weights.batch_stats))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert tree_of(workdir) == before  # nothing moved, deleted or written in the run


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmae_jax.main", *args], cwd=os.path.dirname(CONFIGS),
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_step_without_its_array_metadata_is_skipped_as_damaged_and_says_so(straight_run, tmp_path):
    latest = setup.restore_run(damaged_copy(straight_run[0], str(tmp_path / "run"), (6,), "metadata"))
    assert latest.step == 3 and [step for step, _ in latest.skipped] == [6]
    assert "the metadata of its arrays (state/_METADATA, manifest.ocdbt) is missing" in latest.skipped[0][1]


@pytest.mark.slow
def test_a_step_whose_array_data_changed_on_disk_is_skipped_as_damaged_and_names_them(straight_run, tmp_path):
    """Orbax checks no array's bytes; each array's fingerprint, saved beside it, is checked at restore (a
    flipped bit: tests/test_fingerprints.py)."""
    latest = setup.restore_run(damaged_copy(straight_run[0], str(tmp_path / "run"), (6,), "step 3"))
    assert latest.step == 3 and [step for step, _ in latest.skipped] == [6]
    assert re.fullmatch(r"DamagedArraysError: the data of batch_stats/\S+; \S+; \S+; and \d+ more changed on disk "
                        r"since the save", latest.skipped[0][1]), latest.skipped[0][1]


@pytest.mark.slow
def test_a_damaged_step_asked_for_by_number_or_as_best_is_a_one_line_error(straight_run, tmp_path):
    workdir = damaged_copy(straight_run[0], str(tmp_path / "run"), (6,), "delete")
    expected = (rf" in {re.escape(workdir)}/checkpoints cannot be restored \(\w+: .+\); use --config.checkpoint=latest "
                r"to take the newest step that restores \(steps there: \[3, 6\]\)")
    with pytest.raises(config_lib.ConfigError) as error:
        setup.restore_run(workdir, "best")
    assert re.fullmatch(r"the 'best' checkpoint \(step 6\)" + expected, str(error.value)), str(error.value)

    result = run_main("--config=configs/evaluate.py", f"--workdir={tmp_path / 'eval'}",
                      f"--config.checkpoint_dir={workdir}", "--config.checkpoint=6")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"error: checkpoint step 6" + expected, last), last
    assert setup.restore_run(workdir, "3").step == 3


@pytest.mark.slow
def test_a_run_whose_every_step_is_damaged_lists_each_with_its_reason(straight_run, tmp_path):
    workdir = damaged_copy(straight_run[0], str(tmp_path / "run"), (3, 6), "delete")
    with pytest.raises(checkpoint.CheckpointsUnreadableError) as error:
        setup.restore_run(workdir)
    assert re.fullmatch(rf"none of the checkpoints in {re.escape(workdir)}/checkpoints can be restored "
                        r"\(step 6: \w+: [^;]+; step 3: \w+: [^;]+\); check that the run's disk is intact, or "
                        r"point --config.checkpoint_dir at another run", str(error.value)), str(error.value)


@pytest.mark.slow
def test_evaluate_of_a_run_with_a_damaged_newest_step_uses_the_previous_and_says_so(straight_run, tmp_path):
    workdir = damaged_copy(straight_run[0], str(tmp_path / "run"), (6,), "truncate")
    before = tree_of(workdir)
    result = run_main("--config=configs/evaluate.py", f"--workdir={tmp_path / 'eval'}",
                      f"--config.checkpoint_dir={workdir}", "--config.num_workers=0", "--config.batch_size=32")
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    notices = [line for line in result.stdout.splitlines() if line.startswith("notice: used checkpoint")]
    assert notices == [setup.restore_run(workdir).skipped_notice()]
    assert notices[0].startswith(f"notice: used checkpoint step 3 of {workdir}/checkpoints: the newer step(s) [6] ")
    saved = json.loads((tmp_path / "eval" / "eval_metrics.json").read_text())
    assert saved["checkpoint_step"] == 3 and np.isfinite(saved["loss"])
    assert tree_of(workdir) == before  # the stage only read the run


@pytest.mark.slow
def test_killed_run_with_a_cut_off_metrics_line_resumes_to_the_straight_run(straight_run, demo_root, tmp_path, monkeypatch):
    overrides = RESUME_OVERRIDES
    (straight_dir, _), resumed_dir = straight_run, str(tmp_path / "resumed")

    real = sharding.global_batch
    calls = []

    def dies_on_fifth_batch(host_batch, mesh):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        return real(host_batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", dies_on_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        pretrain_stage.run(stage_config("pretrain", demo_root, **overrides), resumed_dir)
    # A kill ends the save of step 3 with the process; in this one it goes on in the background: let it end.
    deadline = time.monotonic() + 120
    while not os.path.isdir(os.path.join(resumed_dir, "checkpoints", "3")) and time.monotonic() < deadline:
        time.sleep(0.1)
    with open(os.path.join(resumed_dir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 5, "split": "tra')  # a kill in the middle of a metrics line
    cut = os.path.join(resumed_dir, "checkpoints", "6.orbax-checkpoint-tmp-1764328000", "state")
    os.makedirs(cut)  # and, had it been a kill -9 during a save, orbax's folder of the save cut short
    with open(os.path.join(cut, "d"), "wb") as f:
        f.write(b"partial array data")
    monkeypatch.setattr(sharding, "global_batch", real)
    pretrain_stage.run(stage_config("pretrain", demo_root, **overrides), resumed_dir)

    assert sorted(os.listdir(os.path.join(resumed_dir, "checkpoints"))) == ["3", "6"]  # the cut save removed
    assert_same_final_run(straight_dir, resumed_dir)  # the killed run's step-4 record was written again
    assert [r["step"] for r in read_metrics(resumed_dir)] == [1, 2, 3, 4, 5, 6, 6]


def test_non_finite_loss_stops_with_the_last_good_checkpoint():
    with pytest.raises(FloatingPointError, match="loss became non-finite at step 7; the last good checkpoint is step 5"):
        divergence.check_finite({"loss": float("nan"), "lr": 0.1}, 7, "/w/checkpoints", 5)
    with pytest.raises(FloatingPointError, match="a run already diverging there fails again from it at any rate"):
        divergence.check_finite({"loss": float("inf")}, 7, "/w/checkpoints", 5)  # weights may be finite but huge
    divergence.check_finite({"loss": 1.0}, 7, "/w/checkpoints", 5)
    # Training reads its metrics at log and save steps only: it says where the divergence may lie.
    with pytest.raises(FloatingPointError, match=r"^loss became non-finite at one of steps 6-10 \(read at step 10\); "
                                                 "the last good checkpoint is step 5"):
        divergence.check_finite({"loss": float("nan")}, 10, "/w/checkpoints", 5, last_read=5)
    with pytest.raises(FloatingPointError, match=r"^loss became non-finite at step 10; "):
        divergence.check_finite({"loss": float("nan")}, 10, "/w/checkpoints", 5, last_read=9)


def test_a_non_finite_loss_puts_the_checkpoint_it_names_on_disk_before_stopping(demo_root, tmp_path, monkeypatch):
    """Every process of a job stops at the same step; the entry point then ends a multi-process job
    at once, so the save in flight must be finished here, not by the interpreter's exit."""
    events = []
    make_manager = checkpoint.make_manager

    def spied_manager(*args, **kwargs):
        manager = make_manager(*args, **kwargs)
        wait = manager.wait_until_finished
        monkeypatch.setattr(manager, "wait_until_finished", lambda: events.append("wait") or wait())
        return manager

    def diverge(metrics, step, checkpoint_dir, last_saved, dtype, last_read):
        reads.append((step, last_read))
        if step == 4:
            events.append("nan")
            raise FloatingPointError(f"loss became non-finite at step 4; the last good checkpoint is step {last_saved}")

    monkeypatch.setattr(checkpoint, "make_manager", spied_manager)
    monkeypatch.setattr(trainer, "check_finite", diverge)
    reads = []
    config = stage_config("pretrain", demo_root, total_steps=4, log_every=2, eval_every=0, checkpoint_every=2)
    with pytest.raises(FloatingPointError, match="the last good checkpoint is step 2"):
        pretrain_stage.run(config, str(tmp_path))
    assert events[-2:] == ["nan", "wait"]
    assert reads == [(2, 0), (4, 2)]  # read every other step: each names the step read before


@pytest.mark.slow
def test_evaluate_a_pretraining_run_reports_masked_patch_mse_and_draws_reconstructions(pretrained, tmp_path, capsys):
    workdir, _, final = pretrained
    evaluate = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "evaluate")
    evaluate.update(checkpoint_dir=workdir, checkpoint="best", num_workers=0, batch_size=32)
    result = evaluate_stage.run(evaluate, str(tmp_path))
    assert result["loss"] == pytest.approx(final["loss"], rel=1e-5)  # the same fixed evaluation masks
    assert result["checkpoint_step"] == 30
    assert "masked-patch MSE" in capsys.readouterr().out
    assert Image.open(tmp_path / "reconstructions.png").width == (4 * 34 + 2) * 4


def test_settings_that_do_less_than_they_suggest_are_warned_of():
    shard_map_fsdp, sparse_finetune = start_warnings.step_layout_warnings("finetune", "shard_map", 2, "sparse")
    assert shard_map_fsdp.startswith("config.step_impl=shard_map with config.mesh.fsdp=2: the step gathers the "
                                     "parameters whole to use them")
    assert sparse_finetune.startswith("config.model.mask_mode=sparse applies to pretraining only")
    assert start_warnings.step_layout_warnings("pretrain", "shard_map", 1, "sparse") == []
    assert start_warnings.step_layout_warnings("finetune", "jit", 8, "encoder") == []


def test_gradient_accumulation_on_cpu_computes_convolutions_as_matmuls_or_warns():
    # XLA:CPU's convolutions are ~6x slower inside the micro-batch loop: 'auto' makes them matmuls there.
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    assert setup.build_model(config)[0].config.conv_impl == "xla"
    config.grad_accum_steps = 2
    assert setup.build_model(config)[0].config.conv_impl == "matmul"
    assert start_warnings.accumulation_warning(4, "cpu", "auto") is None
    assert start_warnings.accumulation_warning(4, "cpu", "taps") is None  # no convolution left in the loop either
    # Chosen by hand, XLA's convolutions inside the loop get a warning that says what to do.
    message = start_warnings.accumulation_warning(4, "cpu", "xla")
    assert message.startswith("config.grad_accum_steps=4 on CPU") and "~6x slower" in message
    assert "conv_impl=auto" in message
    assert start_warnings.accumulation_warning(1, "cpu", "xla") is None
    assert start_warnings.accumulation_warning(4, "gpu", "xla") is None
    assert start_warnings.accumulation_warning(4, "tpu", "xla") is None


def running_input_workers() -> list:
    """This process's grain worker processes (started by multiprocessing's spawn); at least one."""
    workers = [child for child in multiprocessing.active_children()
               if "spawn" in " ".join(open(f"/proc/{child.pid}/cmdline").read().split("\0"))]
    assert workers
    return workers


def test_a_killed_input_worker_stops_the_run_with_one_line_and_its_steps_saved(demo_root, tmp_path):
    """The out-of-memory killer's usual victim: a grain worker. The run saves the steps it finished
    (the data iterator's state is a batch count) and names the cause; a rerun continues there."""
    config = stage_config("pretrain", demo_root, total_steps=60, log_every=100, eval_every=0, checkpoint_every=100)
    config.data.num_workers = 1
    real, calls = sharding.global_batch, []

    def kill_the_workers_at_the_third_batch(host_batch, mesh):
        calls.append(1)
        if len(calls) == 3:
            for worker in running_input_workers():
                os.kill(worker.pid, signal.SIGKILL)
        return real(host_batch, mesh)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sharding, "global_batch", kill_the_workers_at_the_third_batch)
        with pytest.raises(input_workers.InputWorkerDiedError) as stopped:
            pretrain_stage.run(config, str(tmp_path))
    message = str(stopped.value)
    saved = int(re.search(r"Steps up to (\d+) are saved in ", message).group(1))
    assert message.startswith("an input worker process was killed by signal 9 (SIGKILL), most often the kernel's "
                              "out-of-memory killer") and "--config.data.num_workers, now 1" in message
    assert 3 <= saved == len(calls) < 60
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), 3, read_only=True)
    assert manager.latest_step() == saved
    assert user_errors.one_line(stopped.value) == message


def evaluated_every_2_steps(demo_root, monkeypatch, total_steps, at_step_4):
    """A one-block pretraining config evaluated every 2 steps whose evaluation at step 4 is
    `at_step_4(the real evaluation)`."""
    real = evaluation.evaluate

    def evaluate(task, eval_step, state, examples, **kwargs):
        evaluation = functools.partial(real, task, eval_step, state, examples, **kwargs)
        return at_step_4(evaluation) if int(jax.device_get(state.step)) == 4 else evaluation()

    monkeypatch.setattr(evaluation, "evaluate", evaluate)
    config = stage_config("pretrain", demo_root, total_steps=total_steps, log_every=100, eval_every=2,
                          checkpoint_every=100)
    return config


def test_a_non_finite_evaluation_stops_the_run_before_its_checkpoint_is_saved(demo_root, tmp_path, monkeypatch):
    """Evaluation runs on BatchNorm's running averages, which can blow up while training's batch
    statistics stay finite: the step's checkpoint would then be saved (and ranked by a NaN)."""
    def nan_loss(evaluation):
        metrics, outputs = evaluation()
        return {**metrics, "loss": float("nan")}, outputs

    config = evaluated_every_2_steps(demo_root, monkeypatch, 6, nan_loss)
    with pytest.raises(divergence.TrainingDivergedError, match=r"^val/loss became non-finite at step 4; the last good "
                       r"checkpoint is step 2 in "):
        pretrain_stage.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # best_metric: every evaluated step saved
    assert [r["step"] for r in read_metrics(str(tmp_path)) if r["split"] == "val"] == [2, 4]  # the NaN recorded
    last = (tmp_path / "metrics.jsonl").read_text().splitlines()[-1]
    assert json.loads(last, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))["loss"] is None


def test_a_worker_lost_in_the_last_evaluation_leaves_that_step_for_the_rerun(demo_root, tmp_path, monkeypatch):
    """Saved without its evaluation, the last step would make a rerun find the run finished and never
    evaluate (or draw) it: the rerun redoes it instead."""
    def worker_dies(evaluation):
        raise input_workers.InputWorkerDiedError("an input worker process was killed by signal 9")

    config = evaluated_every_2_steps(demo_root, monkeypatch, 4, worker_dies)
    with pytest.raises(input_workers.InputWorkerDiedError, match=r"Steps up to 2 are saved in .*: rerunning the same "
                       r"command resumes there$"):
        pretrain_stage.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_a_worker_lost_in_an_intermediate_evaluation_is_evaluated_by_the_rerun_as_in_a_straight_run(
        demo_root, tmp_path, monkeypatch):
    """Its step is saved (training lost nothing) without its evaluation: the rerun evaluates it first,
    writes its val row and saves it again with its metrics, which rank it for 'best'."""
    def worker_dies(evaluation):
        raise input_workers.InputWorkerDiedError("an input worker process was killed by signal 9")

    config = evaluated_every_2_steps(demo_root, monkeypatch, 6, worker_dies)
    with pytest.raises(input_workers.InputWorkerDiedError, match=r"Steps up to 4 are saved in "):
        pretrain_stage.run(config, str(tmp_path / "resumed"))
    assert 4 not in [r["step"] for r in read_metrics(str(tmp_path / "resumed")) if r["split"] == "val"]
    monkeypatch.undo()  # the real evaluation from here on
    pretrain_stage.run(config, str(tmp_path / "resumed"))
    pretrain_stage.run(config, str(tmp_path / "straight"))
    rows = {run: [r for r in read_metrics(str(tmp_path / run)) if r["split"] == "val"]
            for run in ("resumed", "straight")}
    assert [r["step"] for r in rows["resumed"]] == [r["step"] for r in rows["straight"]] == [2, 4, 6]
    for resumed, straight in zip(rows["resumed"], rows["straight"]):
        assert resumed["loss"] == pytest.approx(straight["loss"], rel=1e-5)
    managers = {run: checkpoint.make_manager(str(tmp_path / run / "checkpoints"), 3, config.best_metric,
                                             config.best_mode, read_only=True) for run in rows}
    assert managers["resumed"].metrics(4) == pytest.approx(managers["straight"].metrics(4))
    assert managers["resumed"].best_step() == managers["straight"].best_step()


def test_sigterm_to_the_input_workers_too_is_a_preemption_not_a_dead_worker(demo_root, tmp_path, monkeypatch):
    """SLURM signals every process of a job step, the input workers included: they ignore it, and the
    trainer saves after its step and stops as preempted."""
    from gmae_jax.train.preemption import Preempted

    config = stage_config("pretrain", demo_root, total_steps=60, log_every=100, eval_every=0, checkpoint_every=100)
    config.data.num_workers = 1
    real, calls = sharding.global_batch, []

    def sigterm_the_workers_then_the_trainer(host_batch, mesh):
        calls.append(1)
        if len(calls) == 3:  # the workers' SIGTERM first: batches 4-12 are read after it
            for worker in running_input_workers():
                os.kill(worker.pid, signal.SIGTERM)
            time.sleep(1.0)
        if len(calls) == 12:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(host_batch, mesh)

    monkeypatch.setattr(sharding, "global_batch", sigterm_the_workers_then_the_trainer)
    with pytest.raises(Preempted):
        pretrain_stage.run(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["12"]
    metrics = tmp_path / "metrics.jsonl"  # the lines of a straight run only: none before step 60 here
    assert not metrics.exists() or not [r for r in read_metrics(str(tmp_path)) if r["split"] == "train"]


def test_finetune_refuses_classes_without_a_training_image(tmp_path):
    """HaGRID data whose tree lacks a class the run names (a partial download, a typo in
    data.classes) trained a classifier on outputs that never saw an image, without a word."""
    tree = fx.make_tree(tmp_path / "hagrid", "v2", classes=("call", "like", "peace"), num_users=3,
                        images_per_user=2, splits=("train", "val"))
    config = stage_config("finetune", str(tree.root), num_classes=4)
    config.data.update(classes="call,like,peace,rock", mode="full_frame")
    with pytest.raises(config_lib.ConfigError, match=r"holds no image of 1 of the 4 classes \(rock\), which the "
                                                     r"classifier could never learn: --config.data.classes=present "
                                                     r"trains on the classes found, or name those with images: "
                                                     r"--config.data.classes=call,like,peace$"):
        finetune_stage.open_data(config)
    config.update(num_classes=3)
    config.data.classes = "present"
    assert finetune_stage.open_data(config).class_names == ["call", "like", "peace"]
    # A class folder whose images no annotation file lists: 'present' finds the class, not its images.
    (tree.root / "hagrid_dataset" / "rock").mkdir()
    shutil.copy(next((tree.root / "hagrid_dataset" / "call").iterdir()), tree.root / "hagrid_dataset" / "rock")
    config.update(num_classes=4)
    config.data.update(classes="present", max_dropped_fraction=1.0)
    with pytest.raises(config_lib.ConfigError, match=r"\(rock\), which the classifier could never learn: name the "
                                                     r"classes with images, --config.data.classes=call,like,peace "):
        finetune_stage.open_data(config)
