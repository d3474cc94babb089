"""Every mistake a user can make ends the entry point with exit code 1 and one line `error: ...` that
names the cause, without a traceback (unless --debug / GMAE_DEBUG=1), and without creating folders
in a run it only reads."""

import errno
import os
import pathlib
import re
import subprocess
import sys

import pytest
from etils import epath

from gmae_jax import user_errors, workdir_lock
from gmae_jax.data import synthetic
from gmae_jax.train import resume_check, sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = "--config=configs/pretrain.py:runlocal"


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmae_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write_demo_dataset(str(root), image_size=32, train_per_class=8, val_per_class=2, classes=("fist", "palm"))
    return root


@pytest.fixture(scope="module")
def run_without_checkpoints(tmp_path_factory):
    """The workdir of a run that stopped before its first checkpoint: config.json, classes.json only."""
    from gmae_jax import config_lib

    workdir = tmp_path_factory.mktemp("run")
    config = config_lib.load_sibling_config(os.path.join(REPO, "configs", "x.py"), "pretrain", "runlocal")
    resume_check.write_run_files(config, str(workdir), ["fist", "palm"])
    return workdir


def unwritable_folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """A folder this user cannot create anything in (root ignores permissions: then sysfs)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "run" if not os.access(folder, os.W_OK) else pathlib.Path("/sys/gmae_jax_test_run")


def unknown_field(tmp_path, data_root):
    return [PRETRAIN, f"--workdir={tmp_path / 'w'}", "--config.modle.embed_dim=3"], (
        "--config.modle.embed_dim: config has no field 'modle'; did you mean --config.model.embed_dim?")


def unknown_nested_field(tmp_path, data_root):
    return [PRETRAIN, f"--workdir={tmp_path / 'w'}", "--config.model.embd_dim=3"], (
        "--config.model.embd_dim: config.model has no field 'embd_dim'; did you mean --config.model.embed_dim?")


def unknown_preset(tmp_path, data_root):
    return ["--config=configs/pretrain.py:model=huge", f"--workdir={tmp_path / 'w'}"], (
        "unknown model preset 'huge'; choose one of ['base', 'micro', 'mini', 'reference', 'small', 'tiny']")


def missing_config_file(tmp_path, data_root):
    return ["--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"], (
        "cannot load the config file: [Errno 2] No such file or directory: 'configs/nope.py'")


def init_from_missing(tmp_path, data_root):
    missing = tmp_path / "no_such_run"
    return ["--config=configs/finetune.py:runlocal", f"--workdir={tmp_path / 'w'}", f"--config.data.root={data_root}",
            "--config.num_classes=2", f"--config.init_from={missing}"], (
        f"config.init_from={missing} does not exist; point it at the workdir of a pretraining run, or set "
        "--config.init_from='' to train from scratch")


def read_only_workdir(tmp_path, data_root):
    workdir = unwritable_folder(tmp_path)
    return [PRETRAIN, f"--workdir={workdir}", f"--config.data.root={data_root}"], re.compile(
        rf"cannot write in workdir {re.escape(str(workdir))} \((Permission denied|Operation not permitted)\); "
        "choose a --workdir you can write to, or make that folder writable")


def empty_workdir(tmp_path, data_root):  # e.g. --workdir=$WORKDIR with the variable unset: not the current folder
    return [PRETRAIN, "--workdir=", f"--config.data.root={data_root}"], (
        "flag --workdir=: --workdir is empty; name the run's folder, e.g. --workdir=runs/pretrain")


def a_section_given_a_value(tmp_path, data_root):  # the preset belongs in the variant
    return [PRETRAIN, f"--workdir={tmp_path / 'w'}", "--config.model=small"], (
        "--config.model=small: config.model is a section of fields, not a value; set one of its fields "
        "(--config.model.<field>=...), or choose a model preset with the config's variant: "
        "--config=configs/<stage>.py:model=small")


def bucket_with_one_slash(tmp_path, data_root):  # as a local path it would train into ./gs:/, then fail
    return [PRETRAIN, "--workdir=gs:/bucket/run", f"--config.data.root={data_root}"], (
        "--workdir='gs:/bucket/run' is not a bucket path: write gs://BUCKET/PATH (two slashes)")


@pytest.mark.parametrize("flag, hint", [
    ("--config.patch_size=8", "did you mean --config.model.patch_size?"),  # not the sibling batch_size
    ("--config.lr=1e-3", "did you mean --config.optim.lr?"),
    ("--config.img_size=30", "did you mean --config.model.img_size?"),
    ("--config.optim.lrr=1", "did you mean --config.optim.lr?"),
    ("--config.modle.embed_dim=3", "did you mean --config.model.embed_dim?"),
    ("--config.data.mask_ratio=0.5", "did you mean --config.mask_ratio?"),
    ("--config.zzzz=1", "fields: ["),
])
def test_a_field_named_in_the_wrong_section_is_pointed_to_where_it_is(flag, hint):
    line = user_errors.unknown_field([PRETRAIN, flag])
    assert line.startswith(f"{flag.partition('=')[0]}: config") and hint in line, line


@pytest.mark.parametrize("config, flag, stages", [
    ("finetune", "--config.mask_ratio=0.5", "configs/pretrain.py"),  # was: did you mean --config.model.mlp_ratio?
    ("pretrain", "--config.label_smoothing=0.1", "configs/finetune.py"),
    ("evaluate", "--config.top_k=3", "configs/predict.py"),
])
def test_another_stages_setting_is_named_as_such_not_as_a_typo(config, flag, stages):
    line = user_errors.unknown_field([f"--config=configs/{config}.py", flag])
    assert line.endswith(f"; it is a setting of {stages}, not of configs/{config}.py"), line


def test_a_field_of_both_recipes_names_both():
    line = user_errors.unknown_field(["--config=configs/demo.py", "--config.model.depth=1"])
    assert line.endswith("did you mean --config.finetune.model.depth or --config.pretrain.model.depth?"), line


CASES = [unknown_field, unknown_nested_field, unknown_preset, missing_config_file, init_from_missing,
         read_only_workdir, empty_workdir, bucket_with_one_slash, a_section_given_a_value]


@pytest.mark.parametrize("case", CASES, ids=[case.__name__ for case in CASES])
def test_user_mistake_is_one_line_without_traceback(case, tmp_path, data_root):
    args, expected = case(tmp_path, data_root)
    result = run_main(*args)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    if isinstance(expected, str):
        assert last == f"error: {expected}"
    else:
        assert expected.fullmatch(last.removeprefix("error: ")), last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "no_such_run").exists()  # nothing created where a run was to be read
    assert not os.path.exists(os.path.join(REPO, "gs:"))


def test_evaluate_of_a_run_without_checkpoints_creates_nothing_in_it(run_without_checkpoints, tmp_path):
    before = sorted(os.listdir(run_without_checkpoints))
    result = run_main("--config=configs/evaluate.py", f"--workdir={tmp_path / 'eval'}",
                      f"--config.checkpoint_dir={run_without_checkpoints}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: no 'latest' checkpoint in {run_without_checkpoints}/checkpoints (steps there: [])")
    assert sorted(os.listdir(run_without_checkpoints)) == before  # no checkpoints/ folder appeared


def test_a_busy_workdir_names_its_holder(tmp_path, data_root):
    with workdir_lock.hold(str(tmp_path / "w")):
        since = workdir_lock.read_holder(str(tmp_path / "w"))["since"]
        result = run_main(PRETRAIN, f"--workdir={tmp_path / 'w'}", f"--config.data.root={data_root}")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"PID {os.getpid()}, since {since})" in result.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_exceeded_bad_image_budget_is_one_line(tmp_path, data_root):
    data = tmp_path / "data"
    synthetic.write_demo_dataset(str(data), image_size=32, train_per_class=4, val_per_class=1, classes=("fist", "palm"))
    broken = sorted((data / "train" / "fist").iterdir())[0]
    broken.write_bytes(b"not an image")
    result = run_main(PRETRAIN, f"--workdir={tmp_path / 'w'}", f"--config.data.root={data}",
                      "--config.data.max_bad_images=0", "--config.batch_size=8", "--config.total_steps=2")
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 unreadable images exceed config.data.max_bad_images=0; last: ")
    # Class folders: the prepare stage, which refuses them, is no advice.
    assert last.endswith(". Remove or re-save the files the warnings name, or raise the budget."), last
    assert broken.name in last and "Traceback" not in result.stderr


def test_an_evaluation_split_none_of_whose_images_decodes_stops_before_training(tmp_path):
    """It scored every evaluation as loss 0.0 (pretraining: the best checkpoint, by its minimum) and exited 0."""
    from gmae_jax import config_lib, stages
    from gmae_jax.data import pipeline, sources
    from gmae_jax.schema import DataConfig
    from gmae_jax.train import evaluation

    data = tmp_path / "data"
    synthetic.write_demo_dataset(str(data), image_size=32, train_per_class=4, val_per_class=2, classes=("fist", "palm"))
    for image in (data / "val").glob("*/*"):
        image.write_text("version https://git-lfs.github.com/spec/v1")  # a pointer file, never fetched
    config = config_lib.load_sibling_config(os.path.join(REPO, "configs", "x.py"), "pretrain", "runlocal")
    config.data.root, config.batch_size = str(data), 8
    message = ("none of the 4 evaluation images decodes (the warnings above name them), so an evaluation would score "
               "nothing; Remove or re-save the files the warnings name, or point config.data.eval_split")
    with pytest.raises(pipeline.BadImageBudgetError, match=re.escape(message)):
        stages.run(config, str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists() or not list((tmp_path / "w" / "checkpoints").iterdir())
    # An evaluation that finds them so later (the files replaced mid-run, the evaluate stage) says the same.
    _, _, val = sources.open_sources(DataConfig(root=str(data)))
    with pytest.raises(pipeline.BadImageBudgetError, match="none of the 4 evaluation images decodes"):
        evaluation.evaluate(None, lambda state, batch: {k: batch[k] for k in evaluation.EXAMPLE_COLUMNS}, None, val,
                            image_size=32, batch_size=8, num_workers=0, mesh=sharding.make_mesh())


def test_debug_shows_the_traceback(tmp_path):
    result = run_main("--config=configs/pretrain.py:model=huge", f"--workdir={tmp_path}", env={"GMAE_DEBUG": "1"})
    assert result.returncode != 0 and "Traceback" in result.stderr and "unknown model preset 'huge'" in result.stderr


def test_a_full_disk_or_a_forbidden_file_names_the_path_and_what_to_do(tmp_path, monkeypatch):
    local = type(epath.Path(tmp_path))  # the class epath picks for local paths
    real_open = local.open

    def disk_full(self, mode="r", *args, **kwargs):
        if "w" in mode:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(local, "open", disk_full)
    with pytest.raises(OSError) as raised:
        run = resume_check.ml_collections.ConfigDict({"stage": "pretrain"})
        resume_check.write_run_files(run, str(tmp_path), ["a"])
    wrapped = RuntimeError("orbax: save failed")  # libraries wrap it; the chain is searched
    wrapped.__cause__ = raised.value
    assert user_errors.one_line(wrapped) == (
        f"no space left on the device writing {tmp_path / 'config.json'}; free space there (or use a --workdir "
        "on another disk) and rerun the same command (a training run resumes from its last complete checkpoint)")
    assert user_errors.one_line(ValueError("RESOURCE_EXHAUSTED: No space left on device")).startswith(
        "no space left on the device")
    assert user_errors.one_line(PermissionError(errno.EACCES, "Permission denied", "/w/metrics.jsonl")) == (
        "cannot access /w/metrics.jsonl (Permission denied); fix its permissions for this user, or choose another "
        "folder (--workdir, --config.data.root)")
    assert user_errors.one_line(KeyError("a bug")) is None  # bugs keep their traceback


def test_a_config_file_that_loads_but_is_no_stage_config_is_named():
    line = user_errors.flag_error_line(AttributeError("module 'config_config' has no attribute 'get_config'"),
                                       ["main", "--config=my/config.py:runlocal", "--workdir=w"])
    assert line == "module 'config_config' has no attribute 'get_config' (while reading --config=my/config.py)"


def test_a_program_that_does_not_fit_the_device_names_the_settings_that_make_it_fit():
    import jax
    import jax.numpy as jnp

    with pytest.raises(jax.errors.JaxRuntimeError) as raised:  # 256 TiB: XLA's own RESOURCE_EXHAUSTED
        jax.jit(lambda: jnp.ones((1 << 46,), jnp.float32))().block_until_ready()
    wrapped = RuntimeError("the step failed")
    wrapped.__cause__ = raised.value  # as a library that wraps it would raise it
    line = user_errors.one_line(wrapped)
    assert line.startswith("the device ran out of memory (RESOURCE_EXHAUSTED: Out of memory allocating ")
    for lever in ("--config.model.remat=block", "--config.model.dtype=bfloat16", "--config.grad_accum_steps=K",
                  "--config.mesh.fsdp=N", "--config.batch_size", "--config.model.img_size", "--suite=memory"):
        assert lever in line
    assert user_errors.one_line(jax.errors.JaxRuntimeError("INTERNAL: something else")) is None  # a bug stays one
    tpu = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in "
                                     "memory space hbm. Used 20.5G of 15.48G hbm.")
    assert user_errors.one_line(tpu).startswith("the device ran out of memory (RESOURCE_EXHAUSTED: XLA:TPU compile")
    grpc = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Received message larger than max (5000000 vs. 4194304)")
    assert user_errors.one_line(grpc) is None


def test_a_preset_given_as_a_field_is_refused_for_the_variant(monkeypatch):
    """`--config.model.preset=tiny` changed the name in config.json and nothing else."""
    argv = ["main", "--config=configs/pretrain.py:runlocal", "--workdir=/tmp/w", "--config.model.preset=tiny"]
    assert user_errors.preset_override(argv) == (
        "--config.model.preset=tiny would only rename the model: its sizes come with the config file's variant; "
        "use --config=configs/pretrain.py:model=tiny (and --config.model.<field> to change one size)")
    study = ["main", "--config=configs/study.py", "--config.finetune.model.preset=small"]
    assert user_errors.preset_override(study).startswith("--config.finetune.model.preset=small would only rename")
    assert user_errors.preset_override(["main", "--config=configs/pretrain.py:model=tiny",
                                        "--config.model.embed_dim=64"]) is None
