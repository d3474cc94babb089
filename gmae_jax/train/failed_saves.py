"""Checkpoint saves that fail in orbax's background thread (a full disk, a storage error on one host),
noticed at the next step. Orbax raises such an error only when the next save waits for the last one,
and in a job of several processes that wait never ends: the failed process skips the barrier at which
the others wait for its save, then waits at the next one itself, until orbax's 20-minute timeout
(orbax 0.12). Orbax logs the failure the moment it happens, with the error attached; `FailedSaveWatch`
takes it from that record, and the trainer raises it like any other error of this process: at once
in a single process, at the next save in a job, where every process waits for the others anyway."""

from __future__ import annotations

import logging as pylogging
import time

import jax
import orbax.checkpoint as ocp

from gmae_jax import distributed

# What orbax's background save thread logs, with the error attached, when a save fails.
_BACKGROUND_FAILURE = "in background save thread"
_POLL_S = 0.05
_ASK_OTHERS_EVERY_S = 1.0  # the job's key-value store, for a failure another process reported


class SaveFailedElsewhereError(RuntimeError):
    """Another process of the job failed (its checkpoint save, or anything else) while this one waited
    for their save to complete: this process's line names theirs (`main`)."""


class FailedSaveWatch(pylogging.Handler):
    """Holds the first error of a background save of this process, from orbax's log record of it."""

    def __init__(self) -> None:
        super().__init__(level=pylogging.ERROR)
        self.failure: BaseException | None = None
        pylogging.getLogger("absl").addHandler(self)

    def emit(self, record: pylogging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if self.failure is None and error is not None and _BACKGROUND_FAILURE in record.getMessage():
            self.failure = error

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    def after_step(self) -> None:
        """A single process raises a failed save at once. In a job each process raises it at the next
        save (`wait`), where the others wait too and so learn of it: raised now, it would leave them
        in the next step's collectives, until JAX's heartbeat timeout aborts them."""
        if jax.process_count() == 1:
            self.raise_if_failed()

    def wait(self, manager: ocp.CheckpointManager) -> None:
        """`manager.wait_until_finished()`, which in a job never returns when a process's save failed:
        waits here instead, and raises this process's failure, or says that another process failed."""
        asked_at = time.monotonic()
        while manager.is_saving_in_progress():
            self.raise_if_failed()
            if time.monotonic() - asked_at > _ASK_OTHERS_EVERY_S:
                if distributed.failures_of_others():
                    raise SaveFailedElsewhereError("another process of this job failed while this one waited "
                                                   "for the checkpoint save to complete")
                asked_at = time.monotonic()
            time.sleep(_POLL_S)
        self.raise_if_failed()
        manager.wait_until_finished()  # raises a failure the log did not show (another orbax)

    def close(self) -> None:
        pylogging.getLogger("absl").removeHandler(self)
        super().close()
