"""One writer per workdir: a run holds a lock on its workdir from before its first write to its end,
so a second run started on the same folder stops with one line naming the holder instead of
resuming from the first run's checkpoints and interleaving its metrics.

Local folders use an `fcntl.flock` on `<workdir>/.lock`: the kernel drops it when the holder dies,
so a lock left by `kill -9` is simply taken over. Object stores (gs://) have no such lock; there the
lock is a lease file with the holder's host, PID and a timestamp that a thread refreshes; a lease
that was not refreshed for `LEASE_SECONDS`, or whose PID is dead on this same host, is stale and taken
over. (A lease is best effort: two runs starting within the same second can both read "free".)
Only process 0 of a multi-process job takes the lock; the others learn its outcome from it, and
check that they see its lock file: a workdir that is not the same storage for every process (a local
folder on each host) fails at the first checkpoint save otherwise, hours into the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
from absl import logging
from etils import epath

from gmae_jax.schema import ConfigError

LOCK_FILE = ".lock"
LEASE_SECONDS = 300.0  # a gs:// lease not refreshed for this long belongs to a dead run
REFRESH_SECONDS = 60.0


class WorkdirBusyError(ConfigError):
    """Another live run holds the workdir; the message names it and the ways out."""


class WorkdirNotWritableError(ConfigError):
    """The workdir (or its parent) cannot be created or written; the message says which path."""


class WorkdirNotSharedError(ConfigError):
    """Processes of one job that do not see the same workdir; the message names them."""


@dataclasses.dataclass(frozen=True)
class Holder:
    """Who holds a workdir: written into the lock file so a refused run can name it."""

    host: str
    pid: int
    since: str  # ISO time the lock was taken
    refreshed: float = 0.0  # time.time() of the last lease refresh (leases only)

    @classmethod
    def me(cls) -> Holder:
        now = time.time()
        since = datetime.datetime.fromtimestamp(now, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        return cls(host=socket.gethostname(), pid=os.getpid(), since=since, refreshed=now)

    @classmethod
    def parse(cls, text: str) -> Holder | None:
        try:
            values = json.loads(text)
            return cls(host=str(values["host"]), pid=int(values["pid"]), since=str(values["since"]),
                       refreshed=float(values.get("refreshed", 0.0)))
        except (ValueError, KeyError, TypeError):
            return None  # empty or cut off: no one we can name

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    def describe(self) -> str:
        return f"host {self.host}, PID {self.pid}, since {self.since}"

    def is_dead(self, now: float) -> bool:
        """A lease nobody refreshes, or a PID that no longer runs on this host."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return now - self.refreshed > LEASE_SECONDS


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _busy(workdir: epath.Path, holder: Holder | None) -> WorkdirBusyError:
    who = holder.describe() if holder else "another process"
    return WorkdirBusyError(
        f"workdir {workdir} is in use by a running job ({who}); wait for it to finish or stop it, or "
        "choose another --workdir")


def _not_writable(workdir: epath.Path, error: OSError) -> WorkdirNotWritableError:
    if os.path.islink(workdir) and not os.path.exists(workdir):
        return WorkdirNotWritableError(
            f"workdir {workdir} is a link to {os.readlink(workdir)}, which does not exist; create that folder, or "
            "choose another --workdir")
    return WorkdirNotWritableError(
        f"cannot write in workdir {workdir} ({error.strerror or error}); choose a --workdir you can write "
        "to, or make that folder writable")


def _make_folder(workdir: epath.Path) -> None:
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirNotWritableError(f"--workdir {workdir} is a file, not a folder; choose another --workdir")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise _not_writable(workdir, error) from error


@contextlib.contextmanager
def _flock(workdir: epath.Path) -> Iterator[None]:
    """An exclusive, non-blocking flock on <workdir>/.lock, removed again on release."""
    import fcntl  # POSIX only; object stores use the lease below

    _make_folder(workdir)
    path = workdir / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise _not_writable(workdir, error) from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
            os.close(fd)
            if error.errno in (errno.EAGAIN, errno.EACCES):
                raise _busy(workdir, holder) from None
            raise
        # The previous holder may have removed the file between our open and our lock: then we
        # locked a file nobody else will see, so try again on the new one.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = Holder.parse(os.pread(fd, 4096, 0).decode(errors="replace"))
    if previous is not None:
        logging.warning("took over the lock of workdir %s from a run that ended without releasing it (%s)",
                        workdir, previous.describe())
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, Holder.me().to_json().encode(), 0)
        os.fsync(fd)  # on a shared file system, for the job's other hosts to read (`_check_every_process_sees`)
    except OSError as error:
        os.close(fd)
        raise _not_writable(workdir, error) from error
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # before unlocking, so a waiting run never locks a removed file for long
        os.close(fd)


@contextlib.contextmanager
def _lease(workdir: epath.Path) -> Iterator[None]:
    """A lease file for object stores: taken if absent or stale, refreshed by a thread, removed at the end."""
    _make_folder(workdir)
    path = workdir / LOCK_FILE
    if path.exists():
        holder = Holder.parse(path.read_text())
        if holder is not None and not holder.is_dead(time.time()):
            raise _busy(workdir, holder)
        logging.warning("took over the stale lock of workdir %s (%s)", workdir,
                        holder.describe() if holder else "unreadable lease")
    me = Holder.me()
    try:
        path.write_text(me.to_json())
    except OSError as error:
        raise _not_writable(workdir, error) from error
    if Holder.parse(path.read_text()) != me:  # another run wrote its lease at the same moment
        raise _busy(workdir, Holder.parse(path.read_text()))
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(REFRESH_SECONDS):
            with contextlib.suppress(OSError):
                path.write_text(dataclasses.replace(me, refreshed=time.time()).to_json())

    thread = threading.Thread(target=refresh, name="workdir-lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        with contextlib.suppress(OSError):
            path.unlink()


def _lock(workdir: epath.Path, kind: str) -> contextlib.AbstractContextManager[None]:
    return _flock(workdir) if kind == "flock" else _lease(workdir)


def lock_kind(workdir: str) -> str:
    """'flock' for local folders, 'lease' for object stores (gs://, s3://) where flock does not exist."""
    return "lease" if "://" in str(workdir) else "flock"


@contextlib.contextmanager
def hold(workdir: str, kind: str | None = None) -> Iterator[None]:
    """Holds the workdir for the duration of the block; raises WorkdirBusyError (another live run holds
    it) or WorkdirNotWritableError before anything else is written. `kind` forces 'flock' or 'lease'.
    A folder the lock created is removed again if the block left it empty (a run that failed before
    writing anything leaves no trace)."""
    folder = epath.Path(workdir)
    created = jax.process_index() == 0 and not folder.exists()
    try:
        with _held(folder, kind or lock_kind(workdir)):
            yield
    finally:
        if created:
            _remove_if_empty(folder)


def _remove_if_empty(folder: epath.Path) -> None:
    with contextlib.suppress(OSError):
        if folder.exists() and not any(folder.iterdir()):
            folder.rmdir()


@contextlib.contextmanager
def _held(folder: epath.Path, kind: str) -> Iterator[None]:
    if jax.process_count() == 1:
        with _lock(folder, kind):
            yield
        return
    # Several processes: process 0 alone writes, so it alone locks; the others must stop with it.
    error: Exception | None = None
    with contextlib.ExitStack() as stack:
        if jax.process_index() == 0:
            try:
                stack.enter_context(_lock(folder, kind))
            except ConfigError as refused:
                error = refused
        mine = _holder_digest(folder) if error is None and jax.process_index() == 0 else 0
        failed, digest = multihost_utils.broadcast_one_to_all(np.asarray([error is not None, mine], np.int32))
        if error is not None:
            raise error
        if int(failed):
            raise WorkdirBusyError(f"process 0 could not lock workdir {folder}; see its error")
        _check_every_process_sees(folder, int(digest))
        yield


SHARED_WAIT_S = 10.0  # how long a process looks for process 0's lock file (a shared file system's caches)


def _holder_digest(folder: epath.Path) -> int:
    """32 bits of who holds `folder` per its lock file (0: no readable lock file)."""
    try:
        holder = read_holder(str(folder))
    except OSError:
        holder = None
    if holder is None:
        return 0
    who = json.dumps([holder["host"], holder["pid"], holder["since"]])  # not a lease's refresh time, which moves
    return int(np.frombuffer(hashlib.sha256(who.encode()).digest()[:4], np.int32)[0]) or 1


def _check_every_process_sees(folder: epath.Path, expected: int) -> None:
    """Stops every process of the job, naming those that do not see the lock file process 0 holds: each
    process writes its part of every checkpoint into the workdir. A collective: every process calls it."""
    deadline = time.monotonic() + SHARED_WAIT_S
    while not (seen := _holder_digest(folder) == expected) and time.monotonic() < deadline:
        time.sleep(1.0)
    sees = np.asarray(multihost_utils.process_allgather(np.int32(seen)))
    blind = [int(process) for process in np.flatnonzero(sees.reshape(-1) == 0)]
    if blind:
        which = f"process {blind[0]} does" if len(blind) == 1 else f"processes {blind} do"
        raise WorkdirNotSharedError(
            f"workdir {folder} is not the same folder for every process of this job: {which} not see the lock file "
            f"process 0 holds in it. Every process writes its part of each checkpoint there: give every process the "
            "same --workdir, on storage that every host sees at that path (a shared file system or a gs:// bucket)")


def read_holder(workdir: str) -> dict[str, Any] | None:
    """The holder recorded in a workdir's lock file, or None."""
    path = epath.Path(workdir) / LOCK_FILE
    holder = Holder.parse(path.read_text()) if path.exists() else None
    return dataclasses.asdict(holder) if holder else None
