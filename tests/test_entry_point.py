"""The command line as a user runs it: `python -m gmae_jax.main --config=... --workdir=...`."""

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from gmae_jax import quiet_logs
from gmae_jax.data import synthetic
from gmae_jax.train import preemption

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmae_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_config_value_exits_with_one_line_error(tmp_path):
    result = run_main("--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path}",
                      f"--config.data.root={tmp_path}", "--config.mask_ratio=1.5")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: config.mask_ratio=1.5 must be in (0, 1), e.g. --config.mask_ratio=0.6"
    assert "Traceback" not in result.stderr
    renamed = run_main("--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path / 'run'}",
                       f"--config.data.root={tmp_path}", "--config.model.preset=small")
    assert renamed.returncode == 1 and not (tmp_path / "run").exists()
    assert renamed.stderr.strip().splitlines()[-1].startswith(
        "error: --config.model.preset=small would only rename the model: its sizes come with the config file's "
        "variant; use --config=configs/pretrain.py:model=small")


def test_wrong_folder_layout_names_the_folder(tmp_path):
    (tmp_path / "images").mkdir()
    result = run_main("--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path / 'w'}",
                      f"--config.data.root={tmp_path}")
    assert result.returncode == 1
    assert str(tmp_path) in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_command_pretrains_then_prints_pretrained_and_scratch_accuracy(tmp_path):
    result = run_main(  # the runlocal variant, smaller still
        "--config=configs/demo.py:runlocal", f"--workdir={tmp_path}",
        "--config.dataset.pretrain_train_per_class=8", "--config.dataset.finetune_train_per_class=8",
        "--config.dataset.finetune_val_per_class=4", "--config.labels_per_class=3", "--config.pretrain.total_steps=4",
        "--config.finetune.total_steps=4", "--config.pretrain.batch_size=16", "--config.finetune.batch_size=16",
        # One encoder block each (every code path of the demo, half the compile time).
        "--config.pretrain.model.depth=1", "--config.finetune.model.depth=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "with 3 labelled images per class" in result.stdout
    assert re.search(r"fine-tuned from the pretrained encoder +[0-9.]+\n", result.stdout), result.stdout
    assert re.search(r"trained from scratch \(same steps\) +[0-9.]+\n", result.stdout), result.stdout
    assert re.search(r"chance +0\.250\n", result.stdout), result.stdout
    assert "=== pretrain finished" in result.stdout and "best loss: " in result.stdout
    assert "[pretrain] step 4/4" in result.stderr and "img/s" in result.stderr and "ETA" in result.stderr
    assert re.search(r"\[pretrain\] step 1 \(compiling the step included\) took [\d.]+ s", result.stderr)
    assert re.search(r"JAX \S+ on cpu", result.stderr) and "Unable to initialize backend" not in result.stderr
    # 4 steps against the demo's 30-step warm-up: the warning names the demo's own flags.
    for recipe in ("pretrain", "finetune"):
        assert f"set --config.{recipe}.optim.warmup_steps to a fraction" in result.stderr
    assert not re.search(r"(?<![\w.])config\.optim\.", result.stderr)
    for path in ("pretrain/reconstructions.png", "runs/pretrained_3_s0/confusion_matrix.png",
                 "runs/scratch_3_s0/metrics.jsonl", "pretrain/config.json", "runs/pretrained_3_s0/classes.json",
                 "label_efficiency.json", "label_efficiency.png", "data/finetune_dataset/.complete"):
        assert os.path.exists(tmp_path / path), path
    runs = json.loads((tmp_path / "label_efficiency.json").read_text())["runs"]
    assert {r["init"]: r["steps"] for r in runs} == {"pretrained": 4, "scratch": 4}

    # Other images in the same workdir would be drawn under the finished runs, which would be reused.
    marker = (tmp_path / "data/finetune_dataset/.complete").read_text()
    again = run_main("--config=configs/demo.py:runlocal", f"--workdir={tmp_path}", "--config.dataset.framing=scene",
                     "--config.dataset.pretrain_train_per_class=8", "--config.dataset.finetune_train_per_class=8",
                     "--config.dataset.finetune_val_per_class=4", "--config.labels_per_class=3")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert re.search(r"holds a demo trained on other images \(framing: 'hand_crop' -> 'scene'\); its runs would "
                     r"be reused as finished\. Use another --workdir, or remove pretrain and runs", again.stderr)
    assert (tmp_path / "data/finetune_dataset/.complete").read_text() == marker  # nothing redrawn


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_resumes_from_it(tmp_path):
    data, workdir, log = tmp_path / "data", tmp_path / "run", tmp_path / "log.txt"
    synthetic.write_demo_dataset(str(data), image_size=32, train_per_class=8, val_per_class=2,
                                 classes=("fist", "palm"))
    args = ["--config=configs/pretrain.py:runlocal", f"--workdir={workdir}", f"--config.data.root={data}",
            "--config.checkpoint_every=100000", "--config.log_every=1", "--config.eval_every=0",
            "--config.model.depth=1"]  # one encoder block: preemption is the point; it halves the compile
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "gmae_jax.main", *args, "--config.total_steps=100000"],
                                cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        metrics = workdir / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    last = log.read_text().strip().splitlines()[-1]
    match = re.fullmatch(r"preempted: saved step (\d+) in (.+); rerun the same command to resume from it", last)
    assert proc.returncode == 75 and match, last  # EX_TEMPFAIL: a scheduler may requeue it
    saved = int(match.group(1))
    assert saved >= 2 and (workdir / "checkpoints" / str(saved)).is_dir()

    # A shorter run than the one started is another run: the resume check wants it said explicitly.
    shorter = [*args, f"--config.total_steps={saved + 2}"]
    refused = run_main(*shorter)
    assert refused.returncode == 1 and "total_steps: 100000 -> " in refused.stderr.strip().splitlines()[-1]
    rerun = run_main(*shorter, "--config.resume_policy=allow_changes")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = re.search(rf"resumed from step {saved} in {re.escape(str(workdir))}/checkpoints with changed settings "
                        r"\((.*); recorded in config.history.jsonl\)", rerun.stderr)
    assert resumed and f"total_steps: 100000 -> {saved + 2}" in resumed.group(1), rerun.stderr[-3000:]
    # The entry point's compilation cache (here the test session's, from $JAX_COMPILATION_CACHE_DIR)
    # hands the rerun what the first run compiled.
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    read = re.search(rf"XLA compilation cache {re.escape(cache)}: (\d+) compiled program\(s\) read", rerun.stderr)
    assert read and int(read.group(1)) >= 1, rerun.stderr[-3000:]
    history = [json.loads(line) for line in (workdir / "config.history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"]["total_steps"] == {"old": 100000, "new": saved + 2}


@pytest.mark.parametrize("path, shown", [("/w/checkpoints/6/state/_CHECKPOINT_METADATA", False),
                                         ("/w/checkpoints/6/_CHECKPOINT_METADATA", True)])
def test_orbax_warns_of_a_missing_metadata_file_only_where_it_writes_one(path, shown):
    record = logging.LogRecord("absl", logging.WARNING, "/site-packages/orbax/checkpoint/_src/metadata/checkpoint.py",
                               203, "Metadata file does not exist: %s", (path,), None)
    assert quiet_logs.QuietLibraries().filter(record) is shown


def test_ctrl_c_saves_like_a_preemption_and_a_second_one_stops_at_once():
    """One process: the first SIGINT asks for a checkpoint after this step (exit 130 after it, so nothing
    requeues what a person stopped); a second, later one stops at once; input workers ignore it."""
    code = ("import os, signal, time\n"
            "from gmae_jax.data import input_workers\n"
            "from gmae_jax.train.preemption import PreemptionWatch\n"
            "watch = PreemptionWatch(None)\n"
            "watch.first_step_done()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "stop = watch.stopped(7, '/w/checkpoints')\n"
            "print(watch.received, stop.exit_status, stop, flush=True)\n"
            "if os.fork() == 0:\n"
            "    input_workers.exit_with_parent(os.getppid(), 0, 1)\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    os._exit(3)\n"
            "print('worker', os.waitstatus_to_exitcode(os.wait()[1]), flush=True)\n"
            "time.sleep(1.5)\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(5)\n"
            "print('still running', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert result.stdout == ("True 130 interrupted: saved step 7 in /w/checkpoints; rerun the same command to resume "
                             "from it\nworker 3\n"), result.stderr[-2000:]
    assert result.returncode == -signal.SIGINT
    assert "second Ctrl-C (SIGINT): stopping now" in result.stderr


def test_a_stop_before_the_first_step_is_done_stops_at_once_without_saving():
    """The first step is mostly its compile, and nothing of it is unsaved: a SIGTERM or Ctrl-C then stops
    at once (it used to wait for the compile, train the step and save it)."""
    code = ("import os, signal, sys\n"
            "from gmae_jax.train.preemption import Preempted, PreemptionWatch\n"
            "for signum in (signal.SIGTERM, signal.SIGINT):\n"
            "    watch = PreemptionWatch(None)\n"
            "    try:\n"
            "        os.kill(os.getpid(), signum)\n"
            "        for _ in range(10**6): pass\n"
            "        print('not stopped', flush=True)\n"
            "    except Preempted as stop:\n"
            "        print(stop.exit_status, stop, flush=True)\n"
            "    watch.close()\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines() == [
        "75 preempted (SIGTERM) outside training's steps: every checkpoint on disk stays; rerun the same command",
        "130 interrupted (Ctrl-C) before the first step was done: every checkpoint on disk stays; rerun the same "
        "command"], result.stderr[-2000:]


@pytest.mark.parametrize("when", ["] mesh: ", ": compiling the train step"])  # start-up; the first step
def test_sigterm_before_training_begins_is_a_preemption_too(tmp_path, when):
    """A scheduler may preempt a job while it still starts (compiling, restoring): exit 75 and one line,
    as during training, so a job script requeues it, instead of death by the signal. During the first
    step (its compile: minutes for a large model) too: it waited for the compile, trained and saved."""
    data, workdir = tmp_path / "data", tmp_path / "run"
    synthetic.write_demo_dataset(str(data), image_size=32, train_per_class=8, val_per_class=2, classes=("fist", "palm"))
    proc = subprocess.Popen([sys.executable, "-m", "gmae_jax.main", "--config=configs/pretrain.py:runlocal",
                             f"--workdir={workdir}", f"--config.data.root={data}", "--compilation_cache_dir=none"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # the trainer's first line (the mesh), or the last before the first step
        lines.append(line)
        if when in line:
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[1]
    last = (lines + rest.splitlines())[-1].strip()
    assert proc.returncode == 75, "".join(lines) + rest
    assert last == ("preempted (SIGTERM) outside training's steps: every checkpoint on disk stays; rerun the same "
                    "command")
    assert "Traceback" not in rest and "compiling the step included" not in rest
    assert not (workdir / "checkpoints").exists() or not list((workdir / "checkpoints").iterdir())


def test_a_preemption_swallowed_by_python_is_not_reported_with_a_traceback(monkeypatch):
    """The handler's exception raised inside JAX's garbage-collection callback made Python print
    "Exception ignored in ... Traceback" beside the preemption's one line (seen once in CI). Other
    swallowed exceptions still reach the hook that was there before, and installing twice wraps once."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    preemption.quiet_lost_preemptions()
    installed = sys.unraisablehook
    preemption.quiet_lost_preemptions()
    assert sys.unraisablehook is installed

    class RaisesWhenCollected:
        def __init__(self, error):
            self.error = error

        def __del__(self):
            raise self.error

    RaisesWhenCollected(preemption.Preempted(preemption.OUTSIDE_TRAINING))
    RaisesWhenCollected(ValueError("someone else's"))
    assert [type(unraisable.exc_value) for unraisable in reported] == [ValueError]


def test_a_sigterm_whose_exception_was_swallowed_still_stops_the_run(monkeypatch):
    """The handler's exception landed in JAX's garbage-collection callback, which Python reports and
    ignores ("Exception ignored in: <function _xla_gc_callback ...>"): the run trained on to its end
    (seen once in the suite). The training loop's watch sees the remembered signal."""
    monkeypatch.setattr(preemption, "_sigterm_outside_training", threading.Event())
    before = signal.getsignal(signal.SIGTERM)
    try:
        preemption._preempted_outside_training(signal.SIGTERM, None)
    except preemption.Preempted:
        pass  # swallowed, as a gc callback does
    with pytest.raises(preemption.Preempted, match="preempted \\(SIGTERM\\) outside training's steps"):
        preemption.PreemptionWatch(manager=None)
    assert signal.getsignal(signal.SIGTERM) == before  # the watch put the previous handlers back
    preemption._sigterm_outside_training.clear()
    watch = preemption.PreemptionWatch(manager=None)  # before the first step, its own handler too
    try:
        with pytest.raises(preemption.Preempted):
            watch._handle(signal.SIGTERM, None)
        assert watch.should_stop(1)  # after the first step, if that exception was swallowed
    finally:
        watch.close()
