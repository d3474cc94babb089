"""Checkpoint saves that fail in orbax's background thread (a full disk, a storage error on one host),
noticed at the next step. Orbax raises such an error only when the next save waits for the last one,
and in a job of several processes that wait never ends: the failed process skips the barrier at which
the others wait for its save, then waits at the next one itself, until orbax's 20-minute timeout
(orbax 0.12). Orbax logs the failure the moment it happens, with the error attached; `FailedSaveWatch`
takes it from that record, and the trainer raises it at the next step like any other error of this
process (in a job the others then stop too: `job_failures.on_failure_of_another`, which also ends a
process whose save failed only because another's did, before its own record is raised)."""

from __future__ import annotations

import logging as pylogging
import time

import orbax.checkpoint as ocp
from absl import logging as absl_logging

# What orbax's background save thread logs, with the error attached, when a save fails.
_BACKGROUND_FAILURE = "in background save thread"
_POLL_S = 0.05


class FailedSaveWatch(pylogging.Handler):
    """Holds the first error of a background save of this process, from orbax's log record of it."""

    def __init__(self) -> None:
        super().__init__(level=pylogging.ERROR)
        self.failure: BaseException | None = None
        self._logger, self._shown = pylogging.getLogger("absl"), absl_logging.get_absl_handler()
        self._levels = self._logger.level, self._shown.level
        if not self._logger.isEnabledFor(pylogging.ERROR):  # e.g. --verbosity=-3: orbax's record would not be made
            self._shown.setLevel(self._logger.getEffectiveLevel())  # what the log shows stays as asked
            self._logger.setLevel(pylogging.ERROR)
        self._logger.addHandler(self)

    def emit(self, record: pylogging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        if self.failure is None and error is not None and _BACKGROUND_FAILURE in record.getMessage():
            self.failure = error

    def raise_if_failed(self) -> None:
        if self.failure is not None:
            raise self.failure

    def wait(self, manager: ocp.CheckpointManager) -> None:
        """`manager.wait_until_finished()`, which in a job never returns when a process's save failed:
        waits here instead and raises this process's failure. The other processes, waiting here for
        the failed one, stop when it reports its error (`job_failures.on_failure_of_another`)."""
        while manager.is_saving_in_progress():
            self.raise_if_failed()
            time.sleep(_POLL_S)
        self.raise_if_failed()
        manager.wait_until_finished()  # raises a failure the log did not show (another orbax)

    def close(self) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._levels[0])
        self._shown.setLevel(self._levels[1])
        super().close()
