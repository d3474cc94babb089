"""What orbax prints that is not ours to show: warnings about what we asked for (a read-only manager,
our own array handler), and the tracebacks of the reads a failed restore abandons. The failure itself is
reported by the caller."""

from __future__ import annotations

import contextlib
import logging as pylogging
import sys
import warnings
from collections.abc import Iterator
from typing import Any


class _DropRecords(pylogging.Filter):
    """Log records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: pylogging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


@contextlib.contextmanager
def without_log_record(prefix: str) -> Iterator[None]:
    """absl's log records starting with `prefix` are dropped while the block runs."""
    records = _DropRecords(prefix)
    logger = pylogging.getLogger("absl")
    logger.addFilter(records)
    try:
        yield
    finally:
        logger.removeFilter(records)


_NEVER_AWAITED = r"coroutine .* was never awaited"


_quiet_for_good = False  # set after the first failed restore: its filters then stay for the process


@contextlib.contextmanager
def quiet_abandoned_reads() -> Iterator[None]:
    """Orbax runs a restore on a fresh event loop and closes it at the first array that fails; the
    reads of the other arrays, still in flight in tensorstore, then end on the closed loop or are
    collected unfinished, and Python prints a traceback for each (hundreds for one damaged step):
    'RuntimeError: Event loop is closed' or orbax's 'Encountered error while reading array index' (an
    unraisable error, as a coroutine is collected), asyncio's 'Task exception was never
    retrieved' (its logger) and 'coroutine ... was never awaited' (a warning). The failure itself
    is reported by the caller; everything else passes. After a failure the filters stay, once, for
    the rest of the process: those reads may end after the caller has moved on (to an older step,
    or a one-line error and exit)."""
    global _quiet_for_good
    if _quiet_for_good:
        yield
        return
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        error = unraisable.exc_value
        closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        # A read of another array that failed too, raised when its abandoned coroutine is collected.
        failed_read = str(error).startswith("Encountered error while reading array index")
        if not (closed_loop or failed_read):
            previous(unraisable)

    # asyncio's reports of them, with their tracebacks.
    records = _DropRecords("Task exception was never retrieved", "Future exception was never retrieved",
                           "_GatheringFuture exception was never retrieved")
    sys.unraisablehook = hook
    pylogging.getLogger("asyncio").addFilter(records)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)
            yield
    except BaseException:
        warnings.filterwarnings("ignore", _NEVER_AWAITED, RuntimeWarning)  # for the reads still in flight
        _quiet_for_good = True
        raise
    sys.unraisablehook = previous
    pylogging.getLogger("asyncio").removeFilter(records)
