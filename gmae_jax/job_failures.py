"""How the processes of a multi-process job learn of each other's failure and leave together: each
leaves its one-line error in the job's key-value store (kept by process 0's coordination service),
watches the store for the others', and counts there each second so that process 0 notices one that
was killed outright. Without this, the others wait for a failed process in a collective until JAX
aborts them, with no word of why."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NoReturn

import jax
from absl import logging
from jax._src import distributed as jax_distributed  # the job's key-value store, as orbax reaches it
from jax.experimental import multihost_utils

from gmae_jax.train.preemption import Preempted

# Where a failed process leaves its one-line error for the processes that then wait for it in vain.
_FAILURES = "gmae_jax/failed/"
# Where a failed process says it is leaving, the moment before it ends itself.
_LEFT = "gmae_jax/left/"
# Where each process of a job counts its watch's rounds: a count that stops is a process that has gone.
_ALIVE = "gmae_jax/alive/"
_STORE_TIMEOUT_S = 10.0


def report_failure(line: str) -> None:
    """Leaves this process's error, one line, in the job's key-value store (kept by process 0's
    coordination service) before it leaves the job, so that the others, whose next collective then
    times out, can say what ended the job instead of printing their own timeout. Best effort."""
    _with_store(lambda client: client.key_value_set(f"{_FAILURES}{jax.process_index()}", line))


def failures_of_others() -> dict[int, str]:
    """{process: its one-line error} of the other processes that have failed in this job ({} when
    none has, or when the store cannot be reached, e.g. process 0 itself has gone)."""
    failures = _values_under(_FAILURES) or {}
    failures.pop(jax.process_index(), None)
    return dict(sorted(failures.items()))


WATCH_EVERY_S = 1.0  # how often each process of a job looks for another's failure, and says it is alive
OWN_LINE_GRACE_S = 5.0  # an error this process meets at the same moment (data that differs) is its better line
SILENT_AFTER_S = 30.0  # a process not heard from for this long is gone (killed outright, its host down)


def silent_line(after_s: float) -> str:
    """What the job learns of a process that went without a word."""
    return (f"no word from it for {after_s:.0f} s: it was killed outright (the out-of-memory killer? `dmesg` on its "
            "host says), it hangs (stopped, or stuck in the kernel), or its host went down; rerun the job to resume "
            "from the last checkpoint")


class Silence:
    """Which processes of a job have not counted on for `after_s` (pure: the caller reads the store
    and the clock). A reader that could not look for a while judges nobody by that stretch."""

    def __init__(self, processes: Iterable[int], now: float, after_s: float):
        self._after_s = after_s
        self._read_at = now
        self._heard = {process: (None, now) for process in processes}  # process: (its count, when it last moved)

    def observe(self, counts: Mapping[int, str], now: float) -> set[int]:
        """Takes the counts just read; returns the processes silent for `after_s` or longer."""
        blind = now - self._read_at > 3 * WATCH_EVERY_S
        self._read_at = now
        for process, (count, _) in self._heard.items():
            if blind or counts.get(process) != count:
                self._heard[process] = (counts.get(process), now)
        return {process for process, (_, since) in self._heard.items() if now - since >= self._after_s}


def on_failure_of_another(leave: Callable[[dict[int, str]], None]) -> threading.Thread | None:
    """In a job of several processes, calls `leave(failures_of_others())` from a daemon thread as soon
    as another process reports its failure (`report_failure`). Waiting for it in a collective, they
    would learn of it only from JAX's abort ("another task died", a thread dump under it): when process
    0 goes, or at JAX's heartbeat timeout (~100 s); a checkpoint save it never joins waits 20 minutes.
    A process killed outright reports nothing: each process counts in the store every second, and
    process 0 reports for one whose count stops for SILENT_AFTER_S, so that all stop with that line.
    Returns the watching thread (None in a single process), which ends at this process's exit."""
    if jax.process_count() == 1:
        return None
    done = threading.Event()
    atexit.register(done.set)  # before JAX's own exit hook, registered earlier, shuts the job's client down
    me = jax.process_index()
    silence = Silence(set(range(1, jax.process_count())), time.monotonic(), SILENT_AFTER_S) if me == 0 else None

    def look() -> dict[int, str]:
        _with_store(lambda client: client.key_value_set(f"{_ALIVE}{me}", str(count), allow_overwrite=True))
        seen = failures_of_others()
        if not seen and silence is not None:
            seen = _report_the_silent(silence)
        return seen

    def watch() -> None:
        nonlocal count
        while not done.wait(WATCH_EVERY_S):
            count += 1
            try:
                seen = look()
            except Exception:
                if done.is_set():  # JAX shut down under a round begun before the exit: nothing to watch for
                    return
                raise
            if seen:
                time.sleep(OWN_LINE_GRACE_S)
                leave(failures_of_others() or seen)  # read again: more may have failed; or the store has gone
                return

    count = 0
    thread = threading.Thread(target=watch, name="watch-other-processes", daemon=True)
    thread.start()
    return thread


def _report_the_silent(silence: Silence) -> dict[int, str]:
    """Process 0 reports each process gone silent as failed (for the others to relay) and as left (not
    to be waited for), and returns {process: line} of those."""
    counts = _values_under(_ALIVE)
    if counts is None:  # the store did not answer: no judgement
        return {}
    gone = silence.observe(counts, time.monotonic())
    gone -= _processes_under(_LEFT)  # those that failed and left on their own (this process may be leaving too)
    line = silent_line(SILENT_AFTER_S)
    for process in sorted(gone):
        _with_store(lambda client, process=process: client.key_value_set(f"{_FAILURES}{process}", line))
        _with_store(lambda client, process=process: client.key_value_set(f"{_LEFT}{process}", ""))
    return {process: line for process in sorted(gone)}


def wait_for_failures_of_others(timeout_s: float) -> dict[int, str]:
    """`failures_of_others()` once one is reported, or {} after `timeout_s`: for a process whose
    collective broke or timed out, to learn whether another process failed or went silent first."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = failures_of_others()
        if found or time.monotonic() >= deadline:
            return found
        time.sleep(WATCH_EVERY_S)


def finish_together() -> None:
    """Every process of a job waits here for the others at the end of its stage, while it still watches
    for their failures (`on_failure_of_another`): what process 0 alone does last (the pictures, the
    summary) could fail after the others had finished, leaving them in JAX's shutdown, which aborts
    when process 0 goes. A collective: every process calls it."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("gmae_jax: every process finished its stage")


REPORT_GRACE_S = 20.0  # how long process 0 waits for the others to report the error it met, or to relay it
LEAVE_TIMEOUT_S = 60.0  # how long it waits for those that did to leave
_POLL_S = 0.05
_AFTER_THE_LAST_S = 0.5  # from the last one's word to its exit


def leave_in_order() -> None:
    """Called by a failed process of a job the moment before it ends itself. Process 0 keeps the job's
    coordination service: a process still running when it goes aborts in JAX's C++ client (status -6
    and a stack trace under its error line). Errors that every process meets at once (data that
    differs between hosts, a NaN loss) would so end all but the fastest that way. So the others say
    they are leaving and go; process 0 waits for those that fail too (they report their error first,
    `report_failure`) and goes last. Processes that report nothing within REPORT_GRACE_S (e.g. waiting
    in a collective for process 0) are not waited for."""
    if jax.process_index() != 0:
        _with_store(lambda client: client.key_value_set(f"{_LEFT}{jax.process_index()}", ""))
        return
    others = set(range(1, jax.process_count()))
    start = time.monotonic()
    while True:
        waiting = others - _processes_under(_LEFT)
        if not waiting:
            time.sleep(_AFTER_THE_LAST_S)
            return
        elapsed = time.monotonic() - start
        failing = waiting & _processes_under(_FAILURES)
        if elapsed > LEAVE_TIMEOUT_S or (elapsed > REPORT_GRACE_S and not failing):
            return
        time.sleep(_POLL_S)


def _processes_under(prefix: str) -> set[int]:
    return set(_values_under(prefix) or {})


def _values_under(prefix: str) -> dict[int, str] | None:
    """{process: value} of the store's keys under `prefix`; None when the store did not answer."""
    found = _with_store(lambda client: client.key_value_dir_get(prefix))
    return None if found is None else {int(key.rsplit("/", 1)[-1]): value for key, value in found}


def _with_store(call: Callable[[Any], Any]) -> Any:
    """`call(client)` on the job's coordination client, or None when there is none, it fails, or it
    takes longer than _STORE_TIMEOUT_S (a failing process must not hang on a store that has gone)."""
    client = jax_distributed.global_state.client
    if client is None:
        return None
    result: list[Any] = []

    def run() -> None:
        try:
            result.append(call(client))
        except Exception:  # noqa: BLE001 - the store is a courtesy; the error being reported matters
            pass

    thread = threading.Thread(target=run, name="job-key-value-store", daemon=True)
    thread.start()
    thread.join(_STORE_TIMEOUT_S)
    return result[0] if result else None


_VERDICT_GRACE_S = 10.0  # from a silent process's last word to the moment process 0 has reported it
# How a collective (or the key-value store behind it) ends when another process has failed, hangs, or
# has gone: timed out, or (Gloo, on CPU) its connection to the other process closed.
_WAITED_IN_VAIN = ("DEADLINE_EXCEEDED", "Connection closed by peer", "Connection reset by peer")


def waited_in_vain(error: BaseException) -> bool:
    """A collective that timed out or lost its peer: another process's failure, or a hang, shows up
    in this process as this."""
    return any(sign in str(error) for sign in _WAITED_IN_VAIN)


def first_line(error: BaseException) -> str:
    """`Type: message`, its first line, short: what the other processes of a job print of a bug."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def failed_first(others: dict[int, str]) -> str:
    """The line a process prints that stopped because others failed: theirs, named."""
    (process, line), *more = others.items()
    also = f" (and processes {sorted(p for p, _ in more)}; see their logs)" if more else ""
    return f"process {process} of this job failed, so process {jax.process_index()} stops too: {line}{also}"


INTERRUPTED = "interrupted (Ctrl-C)"  # what an interrupted process of a job leaves for the others


def stopped_by_others(others: dict[int, str]) -> tuple[str, int]:
    """The last line and exit status of a process that stops because others failed (theirs, named;
    status 1), or were all interrupted (status 130, as a Ctrl-C to the job's terminal reaches every
    process: one blocked in a collective may learn of it from another first)."""
    if all(line == INTERRUPTED for line in others.values()):
        who = (f"process {next(iter(others))} of this job was" if len(others) == 1
               else f"processes {', '.join(str(process) for process in others)} of this job were")
        return (f"interrupted: {who} interrupted (Ctrl-C), so process {jax.process_index()} stops too",
                Preempted.INTERRUPTED_STATUS)
    return f"error: {failed_first(others)}", 1


def stop_with(others: dict[int, str]) -> NoReturn:
    """Leaves the job because of what `others` reported (`on_failure_of_another`'s `leave`)."""
    line, status = stopped_by_others(others)
    leave(line + "\n", status)


def unanswered_hint(error: BaseException) -> str:
    """A line under a collective's timeout in a multi-process job that no failure was reported to:
    another process may have died without a word (killed, out of memory), and its log may say why."""
    if not waited_in_vain(error):
        return ""
    return (f"note: process {jax.process_index()} waited in vain for another process of the job; if one failed "
            "first, its log names the error to fix (launch/local_multiprocess.sh: $LOG_DIR/process_<rank>.log)\n")


_LEAVING = threading.Lock()  # the main thread's error, or the watch for other processes' (one line, one exit)


def only_this_thread_exits() -> None:
    """Returns in the first thread of this process to end it; any later one waits here for that exit."""
    if not _LEAVING.acquire(blocking=False):
        threading.Event().wait()


def leave(message: str, status: int = 1) -> NoReturn:
    """Ends a process of a multi-process job that failed (or was interrupted), at once, with `status`.
    A normal exit runs JAX's exit hook, whose distributed shutdown waits up to 5 minutes for the other
    processes, which may wait in a collective for this one: the job would hang that long before the
    launcher (or the cluster) could see a process fail and stop the rest. Process 0 leaves last of
    those that fail with it (`leave_in_order`). Errors that every process meets together (a NaN loss)
    have waited for their checkpoint already (`trainer.train`)."""
    only_this_thread_exits()
    sys.stderr.write(message)
    sys.stderr.flush()
    sys.stdout.flush()
    logging.flush()
    for worker in multiprocessing.active_children():  # grain's input workers (which ignore SIGTERM): exiting
        worker.kill()  # so skips their hook
    for worker in multiprocessing.active_children():
        worker.join(timeout=5)
    leave_in_order()
    os._exit(status)


def in_a_job() -> bool:
    """This process is one of several of a JAX job."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def leave_after(error: Exception, line: str | None, debug: bool) -> NoReturn:
    """Ends this process of a job after `error` (handled now), with `line` (its one-line user error,
    None for a bug: its traceback) for the others. An error that is the echo of another process's
    failure (a collective that broke or timed out) gives way to that failure's line, which may take
    until process 0 has found a silent process (SILENT_AFTER_S)."""
    if line is None and not debug:
        others = failures_of_others()
        if not others and waited_in_vain(error):
            others = wait_for_failures_of_others(SILENT_AFTER_S + _VERDICT_GRACE_S)
        if others:
            stop_with(others)
    if not waited_in_vain(error):
        report_failure(line or first_line(error))
    if line is None or debug:
        leave(traceback.format_exc() + unanswered_hint(error))
    leave(f"error: {line}\n")
