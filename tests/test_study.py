"""Few-label fine-tuning: the class-balanced subset sampler, and the label-efficiency study on a
tiny run (its JSON, table and plot)."""

import json
import os
import types

import ml_collections
import numpy as np
import pytest
from PIL import Image

from gmae_jax import config_lib, label_efficiency, schema, stages, workdir_lock
from gmae_jax.data import sources, subsets, synthetic
from gmae_jax.stages import study
from gmae_jax.train import run_folder

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CLASSES = ("fist", "one", "peace")


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A labelled class-folder set: 3 classes x 6 train, x 2 val images at 32 px."""
    root = str(tmp_path_factory.mktemp("labelled"))
    synthetic.write_demo_dataset(root, image_size=32, train_per_class=6, val_per_class=2, classes=CLASSES, seed=3)
    return root, sources.open_sources(schema.DataConfig(root=root))


def _paths(source):
    return [source[i].path for i in range(len(source))]


def test_subset_is_class_balanced_seeded_and_drawn_from_train_only(labelled):
    _, data = labelled
    subset = subsets.class_balanced_subset(data.train, data.class_names, 2, seed=0)
    assert np.bincount(subsets.labels_of(subset), minlength=3).tolist() == [2, 2, 2]
    assert set(_paths(subset)) <= set(_paths(data.train))
    assert not set(_paths(subset)) & set(_paths(data.eval))
    assert _paths(subsets.class_balanced_subset(data.train, data.class_names, 2, seed=0)) == _paths(subset)
    others = [_paths(subsets.class_balanced_subset(data.train, data.class_names, 2, seed=s)) for s in (1, 2, 3)]
    assert any(paths != _paths(subset) for paths in others)
    assert subsets.class_balanced_subset(data.train, data.class_names, 0, seed=0) is data.train  # 0 = all


def test_subset_larger_than_a_class_is_a_config_error(labelled):
    _, data = labelled
    with pytest.raises(config_lib.ConfigError, match="config.labels_per_class=7 but class 'fist' has only 6"):
        subsets.class_balanced_subset(data.train, data.class_names, 7, seed=0)


def test_finetune_trains_on_the_subset_and_evaluates_on_the_whole_val_split(labelled):
    root, data = labelled
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.update(num_classes=3, labels_per_class=1, subset_seed=5)
    config.data.root = root
    opened = stages.get("finetune").open_data(config)
    assert len(opened.train) == 3 and len(opened.eval) == len(data.eval)


def test_summary_table_and_plot_from_runs(tmp_path):
    runs = [{"init": init, "labels_per_class": n, "seed": s, "accuracy": acc, "macro_f1": acc / 2}
            for init, n, s, acc in [("scratch", 5, 0, 0.4), ("scratch", 5, 1, 0.6), ("pretrained", 5, 0, 0.7),
                                    ("pretrained", 5, 1, 0.9), ("scratch", "all", 0, 0.8),
                                    ("pretrained", "all", 0, 0.95)]]
    summary = label_efficiency.summarize(runs)
    by_key = {(r["init"], r["labels_per_class"]): r for r in summary}
    assert by_key["scratch", 5]["accuracy_mean"] == pytest.approx(0.5)
    assert (by_key["pretrained", 5]["accuracy_min"], by_key["pretrained", 5]["accuracy_max"]) == (0.7, 0.9)
    assert by_key["pretrained", "all"]["seeds"] == 1
    text = label_efficiency.table(summary)
    assert text.splitlines()[0] == "| labels / class | scratch | pretrained |"
    assert "| 5 | 0.500 (0.400-0.600, n=2) | 0.800 (0.700-0.900, n=2) |" in text
    assert text.splitlines()[-1].startswith("| all |")
    path = str(tmp_path / "plot.png")
    label_efficiency.save_plot(summary, path, chance=1 / 3)
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    for colour in (label_efficiency._COLOURS["scratch"], label_efficiency._COLOURS["pretrained"]):
        assert (pixels == colour).all(axis=1).sum() > 50  # each curve is drawn
    # The axis says how many images 'all' is: more words in its bottom strip.
    label_efficiency.save_plot(summary, str(tmp_path / "counted.png"), chance=1 / 3, train_images=1234)
    ink = [(np.asarray(Image.open(p).convert("L"))[-30:] < 100).sum() for p in (path, tmp_path / "counted.png")]
    assert ink[1] > 2 * ink[0]


@pytest.mark.slow
def test_tiny_study_end_to_end_writes_every_run_and_resumes(labelled, tmp_path, capsys):
    root, data = labelled
    pretrain_root = str(tmp_path / "unlabelled")
    synthetic.write_demo_dataset(pretrain_root, image_size=32, train_per_class=4, val_per_class=1, classes=CLASSES)
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "study", "runlocal")
    config.update(pretrain_data=pretrain_root, labels_per_class=(2,), seeds=(7,), linear_probe=False)
    config.data.root = root
    for section in (config.pretrain, config.finetune):  # one block: three small runs in all
        section.update(total_steps=3, eval_every=0, checkpoint_every=3, batch_size=8)
        section.model.depth = 1
    config.lock()  # as the entry point hands it over
    workdir = str(tmp_path / "study")
    os.makedirs(workdir)
    leftover = os.path.join(workdir, ".label_efficiency.json.0123456789abcdef.tmp")  # a kill mid-write left it
    open(leftover, "w").write('{"runs": [')
    stages.validate(config)
    report = stages.run(config, workdir)
    assert not os.path.exists(leftover)
    # The budgets stand beside the numbers: a smoke-sized study must not read like a real one.
    assert "; pretraining 3 steps, each fine-tune 3 ===" in capsys.readouterr().out

    written = json.loads(open(os.path.join(workdir, "label_efficiency.json")).read())
    assert written == json.loads(json.dumps(report))
    runs = written["runs"]
    assert {(r["init"], r["labels_per_class"], r["seed"]) for r in runs} == {
        (i, 2, 7) for i in ("scratch", "pretrained")}
    for r in runs:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["macro_f1"] <= 1.0 and r["steps"] == 3
        saved = json.loads(open(os.path.join(r["workdir"], "config.json")).read())
        assert saved["labels_per_class"] == 2 and saved["subset_seed"] == saved["seed"] == 7
        assert bool(saved["init_from"]) == (r["init"] != "scratch")
        assert not saved["freeze_encoder"]
    assert written["chance"] == pytest.approx(1 / 3) and written["val_images"] == len(data.eval)
    assert all(sum(r["val_class_counts"]) == len(data.eval) for r in runs)
    assert len(written["summary"]) == 2
    assert Image.open(os.path.join(workdir, "label_efficiency.png")).size == (640, 420)

    # A second invocation reads every finished result and trains nothing: with its checkpoints
    # moved away, a run that trained again would write new ones.
    checkpoints = os.path.join(next(r["workdir"] for r in runs if r["init"] == "scratch"), "checkpoints")
    for name in os.listdir(checkpoints):
        os.rename(os.path.join(checkpoints, name), os.path.join(tmp_path, name))
    assert stages.run(config, workdir)["runs"] == report["runs"]
    assert os.listdir(checkpoints) == []
    # The other processes of a multi-process study write nothing: process 0 writes the report.
    os.remove(os.path.join(workdir, "label_efficiency.json"))
    with pytest.MonkeyPatch.context() as patch:  # the study's view only: its runs stay one process's
        patch.setattr(study, "jax", types.SimpleNamespace(process_index=lambda: 1))
        assert stages.run(config, workdir)["runs"] == report["runs"]
    assert not os.path.exists(os.path.join(workdir, "label_efficiency.json"))

    # Another recipe in the same workdir is refused before anything is trained or rewritten.
    results = {r["workdir"]: open(os.path.join(r["workdir"], study.RESULT)).read() for r in runs}
    longer = config.copy_and_resolve_references()
    longer.finetune.total_steps = 4
    longer.labels_per_class = (1, 2)  # the runs of 1 label, new, would come first
    with pytest.raises(config_lib.ConfigError, match=r"holds a finished fine-tune of another study setting "
                       r"\(total_steps: 3 -> 4\); nothing was changed"):
        stages.run(longer, workdir)
    assert {w: open(os.path.join(w, study.RESULT)).read() for w in results} == results
    assert os.listdir(checkpoints) == []
    assert sorted(os.listdir(os.path.join(workdir, "runs"))) == ["pretrained_2_s7", "scratch_2_s7"]

    # A longer pretraining would move the step the finished runs started from: refused before it trains.
    grown = config.copy_and_resolve_references()
    grown.pretrain.total_steps = 4
    with pytest.raises(config_lib.ConfigError, match=r"pretrained_2_s7 holds a finished fine-tune of another study "
                       r"setting \(pretraining step: 3 -> 4\)"):
        stages.run(grown, workdir)
    assert run_folder.checkpoint_steps(os.path.join(workdir, "pretrain")) == [3]

    # Only a pretraining run with a checkpoint can be init_from, and a repeated seed is refused.
    from_runs = config.copy_and_resolve_references()
    from_runs.update(pretrain_data="", init_from=runs[0]["workdir"])
    with pytest.raises(config_lib.ConfigError, match=r"is a 'finetune' run; the study compares against a pretraining"):
        stages.validate(from_runs)
    from_runs.init_from = root
    with pytest.raises(config_lib.ConfigError, match=r"config.json not found"):
        stages.validate(from_runs)
    from_runs.init_from = os.path.join(workdir, "pretrain")
    stages.validate(from_runs)
    from_runs.seeds = (7, 7)
    with pytest.raises(config_lib.ConfigError, match=r"config.seeds=\(7, 7\) repeats a value; give each once"):
        stages.validate(from_runs)
    from_runs.seeds = (0, -1)  # was a traceback after the whole pretraining
    with pytest.raises(config_lib.ConfigError, match=r"config.seeds=\(0, -1\): each seed=-1 must be a whole number"):
        stages.validate(from_runs)
    from_runs.seeds, from_runs.labels_per_class = (0,), (2.5,)
    with pytest.raises(config_lib.ConfigError, match=r"config.labels_per_class=\(2.5,\) must be whole numbers"):
        stages.validate(from_runs)

    # Each sub-run is held like a run of its own: one in use by another job stops the study.
    busy = next(r["workdir"] for r in runs if r["init"] == "pretrained")
    os.remove(os.path.join(busy, study.RESULT))
    with workdir_lock.hold(busy):
        with pytest.raises(workdir_lock.WorkdirBusyError, match="in use by a running job"):
            stages.run(config, workdir)


def test_each_study_run_gets_its_start_labels_and_seed_with_one_budget():
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "study")
    config.lock()  # as the entry point hands it over
    assert study.inits(config) == ("scratch", "pretrained", "linear_probe")
    runs = {init: study.finetune_config(config, init, 5, 3, num_classes=4, pretrain_dir="/p")
            for init in study.inits(config)}
    assert {i: (r.init_from, r.freeze_encoder) for i, r in runs.items()} == {
        "scratch": ("", False), "pretrained": ("/p", False), "linear_probe": ("/p", True)}
    for r in runs.values():
        assert (r.labels_per_class, r.subset_seed, r.seed, r.num_classes) == (5, 3, 3, 4)
        assert r.total_steps == config.finetune.total_steps > 0 and r.data.root == config.data.root
    assert study.run_name("linear_probe", 0, 2) == "linear_probe_all_s2"


def test_every_fine_tune_of_a_study_gets_a_fixed_number_of_steps(labelled):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "study", "runlocal")
    config.update(pretrain_data=labelled[0])
    config.data.root = labelled[0]
    config.finetune.total_steps = 0  # epochs: more labels would mean more steps
    with pytest.raises(config_lib.ConfigError, match=r"config.finetune.total_steps=0: the study gives every"):
        stages.validate(config)


def test_a_bad_recipe_value_is_named_before_folders_that_are_not_there_yet(tmp_path):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "study", "runlocal")
    config.update(pretrain_data=str(tmp_path / "not_yet"))
    config.data.root = str(tmp_path / "nor_this")
    config.pretrain.mask_ratio = 1.5
    with pytest.raises(config_lib.ConfigError, match=r"config.pretrain.mask_ratio=1.5 must be in \(0, 1\)"):
        stages.validate(config)
    config.pretrain.mask_ratio = 0.6
    with pytest.raises(config_lib.ConfigError, match=r"config.pretrain_data='\S+/not_yet' does not exist"):
        stages.validate(config)


def test_study_needs_exactly_one_source_of_pretrained_weights(labelled):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "study", "runlocal")
    config.data.root = labelled[0]
    with pytest.raises(config_lib.ConfigError, match="set exactly one of --config.pretrain_data"):
        stages.validate(config)


def test_a_finished_fine_tune_from_an_older_pretraining_step_is_not_reused(tmp_path):
    pretrain = tmp_path / "pretrain"
    (pretrain / "checkpoints" / "5").mkdir(parents=True)  # the pretraining went on since: 3 -> 5
    finished = {"init": "pretrained", "init_step": 3}
    config = ml_collections.ConfigDict({"init_from": str(pretrain)})
    assert study._changes_since(finished, config, str(tmp_path / "run")) == ["pretraining step: 3 -> 5"]
    assert study._changes_since({**finished, "init_step": 5}, config, str(tmp_path / "run")) == []
    assert study._changes_since({"init": "pretrained"}, config, str(tmp_path / "run")) == []  # an older result


def test_too_many_labels_per_class_stops_the_study_before_it_pretrains(labelled, tmp_path):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "study", "runlocal")
    config.update(pretrain_data=labelled[0], labels_per_class=(2, 7), seeds=(0,))
    config.data.root = labelled[0]
    with pytest.raises(config_lib.ConfigError, match="config.labels_per_class=7 but class 'fist' has only 6"):
        stages.run(config, str(tmp_path / "study"))
    assert not (tmp_path / "study" / "pretrain").exists()


def test_chance_is_the_majority_class_rate_of_the_validation_split():
    imbalanced = [{"val_class_counts": [6, 2, 2]}, {"val_class_counts": [6, 2, 2]}]
    assert study.majority_rate(imbalanced, 3) == pytest.approx(0.6)
    assert study.majority_rate([{"accuracy": 0.5}], 4) == pytest.approx(0.25)  # a result older than the counts


def test_finished_runs_outside_this_invocations_grid_are_named_under_its_report(tmp_path):
    """Each invocation writes the report of its own grid over the last one: runs of an earlier grid
    (another labels_per_class) are still there, and the printout says so."""
    runs = tmp_path / "runs"
    for name, result in (("scratch_100_s0", {}), ("pretrained_100_s0", {}), ("scratch_10_s1", {"seed": 1}),
                         ("scratch_all_s0", {"labels_per_class": "all"}), ("pretrained_10_s1", None)):
        (runs / name).mkdir(parents=True)
        if result is not None:  # finished
            (runs / name / study.RESULT).write_text(json.dumps({"labels_per_class": 10, "seed": 0, **result}))
    planned = ml_collections.ConfigDict(dict(labels_per_class=100, seed=0))
    plan = [(planned, str(runs / "scratch_100_s0")), (planned, str(runs / "pretrained_100_s0"))]
    assert study._left_out(str(tmp_path), plan, one_labels_per_class=False) == (
        f"\nnot in this report: 2 finished run(s) of earlier invocations in {runs} (scratch_10_s1, scratch_all_s0); "
        "--config.labels_per_class=10,100,0 --config.seeds=0,1 reports them together (finished runs are reused, "
        "not trained again)")
    # The demo names one labels_per_class: the study's config reports several.
    assert "configs/study.py on the demo's data" in study._left_out(str(tmp_path), plan, one_labels_per_class=True)
    # A result written by another version (or damaged) is still named; the flags leave it out, nothing fails.
    (runs / "scratch_5_s0").mkdir()
    (runs / "scratch_5_s0" / study.RESULT).write_text('{"seed": ')
    assert study._left_out(str(tmp_path), plan, one_labels_per_class=False).startswith(
        "\nnot in this report: 3 finished run(s)")
    (runs / "scratch_5_s0" / study.RESULT).unlink()
    done = plan + [(planned, str(runs / "scratch_10_s1")), (planned, str(runs / "scratch_all_s0"))]
    assert study._left_out(str(tmp_path), done, one_labels_per_class=False) == ""
    assert study._left_out(str(tmp_path / "fresh"), plan, one_labels_per_class=False) == ""
