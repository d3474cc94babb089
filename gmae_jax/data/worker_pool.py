"""The prepare stage's worker processes: a function over many items in completion order, with a
progress bar, that stops with one line when a worker dies instead of waiting for its item."""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import tqdm


class WorkerDiedError(RuntimeError):
    """A worker process of the stage died (killed, most often by the out-of-memory killer, or crashed)."""


def unordered_map(fn: Callable[[Any], Any], items: Sequence, num_workers: int, desc: str) -> Iterator[Any]:
    """fn over items on `num_workers` processes (1: inline), in completion order, with a bar.

    A process pool from concurrent.futures, not multiprocessing's: that one replaces a killed
    worker and waits forever for the item it held; this one raises (BrokenProcessPool). At most
    two items per worker are in flight, so a huge item list costs no memory of futures."""
    bar = tqdm.tqdm(total=len(items), desc=desc, unit=" items", mininterval=2.0)
    if num_workers == 1 or len(items) <= 1:
        for item in items:
            yield fn(item)
            bar.update(1)
        bar.close()
        return
    ours_before = {child.pid for child in multiprocessing.active_children()}
    # spawn, not fork: the parent may hold JAX's threads, which a fork would copy mid-flight.
    pool = concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn"))
    finished = False
    try:
        remaining = iter(items)
        pending = {pool.submit(fn, item) for item in itertools.islice(remaining, 2 * num_workers)}
        while pending:
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            # The finished items first (their shards and checks are kept), then a broken pool's error.
            broken = [f for f in done if isinstance(f.exception(), concurrent.futures.process.BrokenProcessPool)]
            for future in done:
                if future not in broken:
                    bar.update(1)
                    yield future.result()
            if broken:
                raise broken[0].exception()
            pending |= {pool.submit(fn, item) for item in itertools.islice(remaining, len(done))}
        finished = True
    except concurrent.futures.process.BrokenProcessPool as error:  # from a result or from submit
        raise WorkerDiedError(
            f"a worker process of the prepare stage died ({desc}): most often the kernel's out-of-memory killer "
            f"(`dmesg` says). Every finished shard and decode check is kept: rerun the same command to go on, "
            f"with fewer --config.num_workers (this run used {num_workers}) if memory ran out") from error
    finally:
        bar.close()
        pool.shutdown(wait=finished, cancel_futures=True)
        if not finished:  # an error, SIGTERM, or a dead worker: the others stop now, not after their item
            for child in multiprocessing.active_children():
                if child.pid not in ours_before:
                    child.terminate()
