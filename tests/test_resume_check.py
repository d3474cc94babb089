"""Rerunning a workdir that holds a run: binding changes are refused before anything is written,
harmless ones are allowed and recorded in config.history.jsonl. (The byte-identical workdir after a
refused rerun of a real run is tested in test_train.py.)"""

import json
import os
import re

import pytest

from gmae_jax import config_checks, config_lib
from gmae_jax.train import resume_check, run_folder

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def pretrain_config():
    return config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "pretrain", "runlocal")


@pytest.fixture
def run_dir(tmp_path):
    """A workdir as a training run leaves it: config.json, classes.json and a checkpoint step."""
    resume_check.write_run_files(pretrain_config(), str(tmp_path), ["fist", "palm"])
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    return tmp_path


def test_fields_are_binding_unless_listed_as_harmless():
    old = {"model.embed_dim": 32, "seed": 1, "data.root": "/a", "total_steps": 20, "log_every": 5,
           "data.num_workers": 0, "mesh.data": -1, "num_epochs": 3.0, "model.conv_impl": "auto",
           "grad_accum_steps": 1}
    new = {"model.embed_dim": 48, "seed": 2, "data.root": "/b", "total_steps": 30, "log_every": 1,
           "data.num_workers": 4, "mesh.data": 4, "num_epochs": 2.0, "only_new": 1, "model.conv_impl": "matmul",
           "grad_accum_steps": 2}
    binding, harmless = resume_check.compare(old, new)
    # Micro-batches normalise with their own BatchNorm statistics: accumulation changes the numbers.
    assert [name for name, _, _ in binding] == ["data.root", "grad_accum_steps", "model.embed_dim", "num_epochs",
                                                "seed"]
    assert [name for name, _, _ in harmless] == ["data.num_workers", "log_every", "mesh.data", "model.conv_impl",
                                                 "total_steps"]
    assert resume_check.compare({"total_steps": 30}, {"total_steps": 20})[0] == [("total_steps", 30, 20)]


def test_checkpoints_without_their_config_json_are_not_resumed_blindly(run_dir):
    (run_dir / "config.json").unlink()
    with pytest.raises(config_lib.ConfigError, match=r"holds checkpoints \(steps 10\) but no config.json, so what"):
        resume_check.check(pretrain_config(), str(run_dir), ["fist", "palm"])
    assert not (run_dir / "config.json").exists()


def test_binding_changes_are_refused_with_old_and_new_values_and_the_two_ways_out(run_dir):
    config = pretrain_config()
    config.data.root, config.seed = "/other", 7
    before = {name: (run_dir / name).read_bytes() for name in ("config.json", "classes.json")}
    with pytest.raises(config_lib.ConfigError) as refused:
        resume_check.check(config, str(run_dir), ["fist", "palm"])
    message = str(refused.value)
    assert "data.root: 'data/pretrain_dataset' -> '/other'; seed: 42 -> 7" in message
    assert "another --workdir" in message and "--config.resume_policy=allow_changes" in message
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    assert not (run_dir / run_folder.HISTORY_FILE).exists()


@pytest.mark.parametrize("policy", resume_check.RESUME_POLICIES)
def test_a_change_of_the_weights_shapes_is_refused_under_any_policy_without_offering_allow_changes(run_dir, policy):
    config = pretrain_config()
    config.model.depth, config.seed, config.resume_policy = 3, 7, policy
    with pytest.raises(config_lib.ConfigError) as refused:
        resume_check.check(config, str(run_dir), ["fist", "palm"])
    message = str(refused.value)
    assert "model.depth: 2 -> 3; seed: 42 -> 7" in message
    assert "model.depth fixes its saved state (its weights' shapes" in message and "another --workdir" in message
    assert "allow_changes" not in message
    assert not (run_dir / run_folder.HISTORY_FILE).exists()


@pytest.mark.parametrize("field", ["num_heads", "decoder_num_heads"])
def test_other_attention_heads_are_refused_under_any_policy_though_the_shapes_fit(run_dir, field):
    """Under allow_changes the run resumed, its attention weights split into other heads."""
    config = pretrain_config()
    config.resume_policy = "allow_changes"
    config.model[field] = config.model[field] * 2
    with pytest.raises(config_lib.ConfigError, match=rf"model.{field} fixes its saved state \(its weights' shapes, "
                       r"their attention heads"):
        resume_check.check(config, str(run_dir), ["fist", "palm"])


@pytest.mark.parametrize("field, value, refused", [
    ("optim.grad_clip", 0.0, True), ("optim.grad_clip", 0.5, False),  # clipping off; another threshold
    ("optim.layer_decay", 0.75, True),
])
def test_a_change_of_the_optimisers_layout_is_refused_under_any_policy(run_dir, field, value, refused):
    """Under allow_changes the restore failed, asking whether config.json had been edited."""
    config = pretrain_config()
    config.resume_policy = "allow_changes"
    section, name = field.split(".")
    config[section][name] = value
    if not refused:
        assert resume_check.check(config, str(run_dir), ["fist", "palm"])[0][0] == field
        return
    with pytest.raises(config_lib.ConfigError, match=rf"{field} fixes its saved state \(.*or how its optimiser state "
                       r"is laid out\)"):
        resume_check.check(config, str(run_dir), ["fist", "palm"])
    assert resume_check.changes_optimiser_layout("freeze_encoder", False, True)


def test_a_classifiers_class_order_is_refused_under_any_policy_a_pretraining_runs_is_not(tmp_path):
    finetune = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    resume_check.write_run_files(finetune, str(tmp_path), ["fist", "palm"])
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    finetune.resume_policy = "allow_changes"
    with pytest.raises(config_lib.ConfigError, match=r"classes \(classes.json\): \['fist', 'palm'\] -> "
                       r"\['palm', 'fist'\]\); nothing was changed. classes \(classes.json\) fixes its saved state"):
        resume_check.check(finetune, str(tmp_path), ["palm", "fist"])


def test_a_pretraining_runs_classes_may_change_under_allow_changes(run_dir):
    config = pretrain_config()
    config.resume_policy = "allow_changes"
    changes = resume_check.check(config, str(run_dir), ["fist", "palm", "peace"])
    assert ("classes (classes.json)", ["fist", "palm"], ["fist", "palm", "peace"]) in changes


@pytest.mark.parametrize("damage, state", [("", "is empty"), ('{"stage": "pre', "is not valid JSON")])
def test_a_damaged_config_json_is_a_one_line_error_naming_it(run_dir, damage, state):
    (run_dir / "config.json").write_text(damage)
    with pytest.raises(config_lib.ConfigError, match=f"{run_dir / 'config.json'} {state}"):
        resume_check.check(pretrain_config(), str(run_dir), ["fist", "palm"])


@pytest.mark.parametrize("content, what", [
    ("[]", "holds a JSON list"), ("{}", "has no stage, model, seed"),
    ('{"stage": "finetune", "model": {}, "seed": 1}', "has no num_classes"),
    ('{"stage": "pretrain", "model": 3, "seed": 1}', "has no model section")])
def test_a_config_json_that_is_no_runs_config_is_a_one_line_error_naming_it(run_dir, content, what):
    """Valid JSON of another shape: it was an AttributeError, or ({}) a resume that compared nothing."""
    (run_dir / "config.json").write_text(content)
    for read in (lambda: resume_check.check(pretrain_config(), str(run_dir), ["fist", "palm"]),
                 lambda: run_folder.load_run_config(str(run_dir))):
        expected = f"{run_dir / 'config.json'} is no run's config \\(it {what}\\)"
        with pytest.raises(config_lib.ConfigError, match=expected):
            read()


@pytest.mark.parametrize("content, what", [('["fist", "palm", "fist"]', "names fist more than once"),
                                           ('{"fist": 0}', "is no list of class names"),
                                           ('["fist", 3]', "is no list of class names")])
def test_a_classes_json_that_names_no_classes_is_a_one_line_error_naming_it(run_dir, content, what):
    (run_dir / "classes.json").write_text(content)
    with pytest.raises(config_lib.ConfigError, match=f"{run_dir / 'classes.json'} {what}: put back"):
        run_folder.load_class_names(str(run_dir))


def test_run_files_are_replaced_whole_and_leave_no_temporary_file(run_dir):
    config = pretrain_config()
    config.total_steps = 40
    (run_dir / ".metrics.jsonl.0123456789abcdef.tmp").write_text('{"step": 5')  # a kill -9 mid-write left it
    (run_dir / ".keep.tmp").write_text("not ours")  # any other name stays
    resume_check.write_run_files(config, str(run_dir), ["fist", "palm"])
    (run_dir / ".keep.tmp").unlink()
    assert json.loads((run_dir / "config.json").read_text())["total_steps"] == 40
    assert sorted(os.listdir(run_dir)) == ["checkpoints", "classes.json", "config.json"]


def test_other_classes_are_a_binding_change(run_dir):
    with pytest.raises(config_lib.ConfigError, match=r"classes \(classes.json\): \['fist', 'palm'\] -> \['fist'"):
        resume_check.check(pretrain_config(), str(run_dir), ["fist", "one", "palm"])


def test_harmless_changes_are_recorded_in_the_history(run_dir):
    config = pretrain_config()
    config.total_steps, config.log_every = 40, 1
    changes = resume_check.check(config, str(run_dir), ["fist", "palm"])
    resume_check.write_run_files(config, str(run_dir), ["fist", "palm"], changes)
    (line,) = (run_dir / run_folder.HISTORY_FILE).read_text().splitlines()
    record = json.loads(line)
    assert record["changes"] == {"log_every": {"old": 5, "new": 1}, "total_steps": {"old": 20, "new": 40}}
    assert record["resume_policy"] == "check"
    assert json.loads((run_dir / "config.json").read_text())["total_steps"] == 40


def test_allow_changes_resumes_with_binding_changes_and_records_them(run_dir):
    config = pretrain_config()
    config.seed, config.resume_policy = 7, "allow_changes"
    changes = resume_check.check(config, str(run_dir), ["fist", "palm"])
    resume_check.write_run_files(config, str(run_dir), ["fist", "palm"], changes)
    resume_check.write_run_files(config, str(run_dir), ["fist", "palm"], [("log_every", 5, 2)])
    records = [json.loads(line) for line in (run_dir / run_folder.HISTORY_FILE).read_text().splitlines()]
    assert records[0]["changes"]["seed"] == {"old": 42, "new": 7}  # resume_policy itself is harmless
    assert records[0]["resume_policy"] == "allow_changes" and len(records) == 2  # appended


def test_other_training_images_are_binding_and_a_new_planned_length_is_recorded(run_dir):
    facts = {resume_check.TRAIN_IMAGES: 32, resume_check.PLANNED_STEPS: 20}
    resume_check.write_run_files(pretrain_config(), str(run_dir), ["fist", "palm"], facts=facts)
    assert resume_check.check(pretrain_config(), str(run_dir), ["fist", "palm"], facts) == []
    more = {resume_check.TRAIN_IMAGES: 48, resume_check.PLANNED_STEPS: 30}  # images added after a kill
    with pytest.raises(config_lib.ConfigError, match=r"other settings \(data: training images: 32 -> 48\)"):
        resume_check.check(pretrain_config(), str(run_dir), ["fist", "palm"], more)
    config = pretrain_config()
    old_batch = config.batch_size
    config.batch_size, config.resume_policy = old_batch // 2, "allow_changes"  # an epoch budget: more steps
    changes = resume_check.check(config, str(run_dir), ["fist", "palm"], {**facts, resume_check.PLANNED_STEPS: 40})
    assert ("planned total steps", 20, 40) in changes and ("batch_size", old_batch, old_batch // 2) in changes


def test_a_workdir_without_checkpoints_is_a_new_run(run_dir):
    (run_dir / "checkpoints" / "10").rmdir()
    config = pretrain_config()
    config.model.depth = 3
    assert resume_check.check(config, str(run_dir), ["fist", "palm"]) == []


def test_an_unknown_resume_policy_is_a_config_error(tmp_path):
    config = pretrain_config()
    config.data.root, config.resume_policy = str(tmp_path), "force"
    with pytest.raises(config_lib.ConfigError, match="config.resume_policy='force' must be one of"):
        config_checks.validate_training(config)


def test_a_changed_schedule_is_reported_only_where_a_step_follows_it():
    longer = [(resume_check.PLANNED_STEPS, 6, 20)]
    assert "decays over 20 steps instead of 6: steps 7 on" in resume_check.schedule_change_warning(longer, 6, 3)
    assert resume_check.schedule_change_warning(longer, 3, 3) is None  # within the warm-up both agree
    # Shortened below where the run stands (under allow_changes): no step trains on the new schedule.
    shorter = [(resume_check.PLANNED_STEPS, 20, 5)]
    assert resume_check.schedule_change_warning(shorter, 20, 3) is None
    assert resume_check.schedule_change_warning(shorter, 5, 3) is None


def test_another_evaluation_split_resumes_with_a_warning_and_is_recorded(run_dir):
    """A finished run rerun on a grown validation folder rewrote its confusion matrix without a word."""
    facts = {resume_check.TRAIN_IMAGES: 32, resume_check.EVAL_IMAGES: 21}
    resume_check.write_run_files(pretrain_config(), str(run_dir), ["fist", "palm"], facts=facts)
    grown = {**facts, resume_check.EVAL_IMAGES: 30}
    changes = resume_check.check(pretrain_config(), str(run_dir), ["fist", "palm"], grown)
    assert changes == [(resume_check.EVAL_IMAGES, 21, 30)]  # not binding: the policy 'check' lets it resume
    assert resume_check.evaluation_change_warning(changes).startswith(
        "the evaluation split now holds 30 images, not the 21 this run was evaluated on so far")
    assert resume_check.evaluation_change_warning([("log_every", 5, 2)]) is None


def test_a_demo_or_study_folder_given_for_a_run_names_the_runs_it_holds(tmp_path):
    for run in ("pretrain", "runs/pretrained_3_s0", "runs/scratch_3_s0"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "config.json").write_text("{}")
    (tmp_path / "runs" / "label_efficiency.json").write_text("{}")  # no run
    with pytest.raises(config_lib.ConfigError, match=re.escape(
            f"{tmp_path}/config.json not found: point at the workdir of a pretrain or finetune run; it holds runs: "
            f"did you mean {tmp_path}/pretrain or {tmp_path}/runs/pretrained_3_s0 or {tmp_path}/runs/scratch_3_s0?")):
        run_folder.load_run_config(str(tmp_path))
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(config_lib.ConfigError, match=r"not found: point at the workdir of a pretrain or finetune run$"):
        run_folder.load_run_config(str(tmp_path / "elsewhere"))
