"""One writer per workdir: the fcntl lock of local folders and the lease of object stores (run here
on a local folder, through the same etils paths the gs:// runs use)."""

import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from gmae_jax import workdir_lock

LOCK = workdir_lock.LOCK_FILE


@pytest.mark.parametrize("kind", ["flock", "lease"])
def test_a_second_holder_is_refused_with_the_first_ones_host_pid_and_time(tmp_path, kind):
    with workdir_lock.hold(str(tmp_path), kind):
        holder = workdir_lock.read_holder(str(tmp_path))
        assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"in use by a running job \(host "
                           rf"{socket.gethostname()}, PID {os.getpid()}, since {holder['since']}\)"):
            with workdir_lock.hold(str(tmp_path), kind):
                pass
    assert not (tmp_path / LOCK).exists()  # released: the finished workdir holds no lock file
    with workdir_lock.hold(str(tmp_path), kind):  # and can be taken again
        pass


def test_the_lock_is_taken_before_the_workdir_exists(tmp_path):
    workdir = tmp_path / "a" / "b"
    with workdir_lock.hold(str(workdir)):
        assert workdir.is_dir() and (workdir / LOCK).exists()


@pytest.mark.parametrize("kind", ["flock", "lease"])
def test_a_workdir_that_is_a_file_is_refused_saying_so(tmp_path, kind):
    workdir = tmp_path / "notes.txt"
    workdir.write_text("mine")
    with pytest.raises(workdir_lock.WorkdirNotWritableError, match=r"notes.txt is a file, not a folder; choose"):
        with workdir_lock.hold(str(workdir), kind):
            pass
    assert workdir.read_text() == "mine"


def test_a_workdir_that_links_to_nothing_names_where_it_points(tmp_path):
    """It said 'File exists' and to make the folder writable."""
    os.symlink(tmp_path / "on_a_disk_not_mounted", tmp_path / "run")
    with pytest.raises(workdir_lock.WorkdirNotWritableError, match=rf"workdir {tmp_path}/run is a link to "
                       rf"{tmp_path}/on_a_disk_not_mounted, which does not exist; create that folder, or choose"):
        with workdir_lock.hold(str(tmp_path / "run")):
            pass
    assert not (tmp_path / "on_a_disk_not_mounted").exists()


@pytest.mark.parametrize("kind", ["flock", "lease"])
def test_a_run_that_fails_before_writing_leaves_no_folder_it_created(tmp_path, kind):
    new, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    for workdir in (new, existing):
        with pytest.raises(RuntimeError, match="failed"):
            with workdir_lock.hold(str(workdir), kind):
                raise RuntimeError("failed")
    assert not new.exists() and existing.is_dir()
    with workdir_lock.hold(str(new), kind):
        (new / "metrics.jsonl").write_text("{}")
    assert (new / "metrics.jsonl").exists()  # a folder with results stays


def test_a_flock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path, caplog):
    (tmp_path / LOCK).write_text(json.dumps({"host": "gone", "pid": 1, "since": "yesterday", "refreshed": 0}))
    with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path), "flock"):
        pass
    assert "took over the lock" in caplog.text and "host gone, PID 1, since yesterday" in caplog.text


def test_a_flock_held_by_another_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gmae_jax import workdir_lock\n"
         f"with workdir_lock.hold({str(tmp_path)!r}, 'flock'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(workdir_lock.WorkdirBusyError, match=rf"PID {holder.pid}, since"):
            with workdir_lock.hold(str(tmp_path), "flock"):
                pass
    finally:
        holder.kill()
        holder.wait()
    with workdir_lock.hold(str(tmp_path), "flock"):  # the kernel released the killed holder's lock
        pass


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("holder, stale", [
    (dict(host="other-host", pid=123, refreshed_ago=10.0), False),  # a live lease elsewhere
    (dict(host="other-host", pid=123, refreshed_ago=workdir_lock.LEASE_SECONDS + 5), True),  # expired
    (dict(host=socket.gethostname(), pid=None, refreshed_ago=1.0), True),  # fresh, but its PID is dead here
])
def test_a_lease_is_taken_over_only_when_expired_or_its_process_is_dead(tmp_path, holder, stale, caplog):
    lease = {"host": holder["host"], "pid": holder["pid"] or dead_pid(), "since": "earlier",
             "refreshed": time.time() - holder["refreshed_ago"]}
    (tmp_path / LOCK).write_text(json.dumps(lease))
    if stale:
        with caplog.at_level(logging.WARNING), workdir_lock.hold(str(tmp_path), "lease"):
            assert workdir_lock.read_holder(str(tmp_path))["pid"] == os.getpid()
        assert "took over the stale lock" in caplog.text
    else:
        with pytest.raises(workdir_lock.WorkdirBusyError, match="host other-host, PID 123, since earlier"):
            with workdir_lock.hold(str(tmp_path), "lease"):
                pass
        assert json.loads((tmp_path / LOCK).read_text()) == lease  # the live holder's lease is untouched


def test_object_store_paths_use_the_lease():
    assert workdir_lock.lock_kind("gs://bucket/run") == "lease"
    assert workdir_lock.lock_kind("/tmp/run") == "flock"
