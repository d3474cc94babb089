"""The grain worker processes that decode a run's images: how many (`config.data.num_workers`), a
dataset read through them, and their life: each ignores the job's Ctrl-C and SIGTERM (the trainer
stops them after saving), ends with its trainer, lets grain free its last batches' shared memory
before exit, and one that dies is named in one line with what to change."""

import atexit
import contextlib
import functools
import os
import re
import signal
import threading
import time
from collections.abc import Iterator

import grain

from gmae_jax import host_resources

# grain's default reads 500 elements ahead per process; our elements are whole batches, so
# that would hold hundreds of batches in memory in every worker. Two in flight keep the
# consumer fed; workers (num_workers) are where the real parallelism comes from.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=2)
_PARENT_POLL_SECONDS = 1.0
AUTO_WORKERS = -1  # config.data.num_workers: one per core (see worker_count)
MAX_AUTO_WORKERS = 32  # ~870 views/s each from prepared shards at 224 px (BENCHMARKS.md): ~28,000/s


class InputWorkerDiedError(RuntimeError):
    """An input worker process ended mid-run: killed (most often by the kernel's out-of-memory
    killer) or crashed. The run's state is intact; the message says how the worker ended."""


# grain's message for a worker that ended (process_prefetch), with its exit code: -N is signal N.
_WORKER_ENDED = re.compile(r"[Ww]orker process was terminated unexpectedly with exit code (-?\d+)")


@contextlib.contextmanager
def naming_dead_workers(num_workers: int) -> Iterator[None]:
    """Turns grain's error for a dead worker process into an InputWorkerDiedError that says what
    ended it and what to change; every other error passes unchanged."""
    try:
        yield
    except RuntimeError as error:
        match = _WORKER_ENDED.search(str(error))
        if match is None or isinstance(error, InputWorkerDiedError):
            raise
        code = int(match.group(1))
        how = f"ended with exit code {code}" if code >= 0 else f"was killed by signal {-code}"
        if -code == signal.SIGKILL:
            how += " (SIGKILL), most often the kernel's out-of-memory killer (`dmesg` says)"
        raise InputWorkerDiedError(
            f"an input worker process {how}. If memory ran out, use fewer workers "
            f"(--config.data.num_workers, now {num_workers}) or a smaller batch") from error


def exit_with_parent(parent: int, worker_index: int, worker_count: int) -> None:
    """grain worker init: a watchdog thread ends this worker once process `parent` is gone.

    A killed trainer (`kill -9`, the OOM killer) cannot stop its workers, which would live on
    under PID 1 holding their memory. The parent's PID is taken in the parent, so a worker that
    finishes starting after the trainer died exits at once. Polling works on every POSIX system,
    unlike Linux's parent-death signal, which also fires when the thread that started it exits.
    """
    del worker_index, worker_count
    # A Ctrl-C in a terminal, or a scheduler's SIGTERM (SLURM signals every process of the job), reaches
    # the workers too: the trainer saves after its step and stops them. A worker's own KeyboardInterrupt
    # would only print a traceback, and one killed by SIGTERM would end the run as a failed one (a dead
    # worker) instead of a preempted one.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def worker_count(num_workers: int) -> int:
    """`config.data.num_workers` with AUTO_WORKERS resolved: a worker per core this process may use,
    one core left to the trainer, at most MAX_AUTO_WORKERS (never 0: workers keep decoding off the
    trainer's thread). Batches are the same whatever the count, so 'auto' never changes a run's numbers."""
    if num_workers != AUTO_WORKERS:
        return num_workers
    return max(1, min(host_resources.usable_cores() - 1, MAX_AUTO_WORKERS))


@functools.cache
def _finish_shared_memory_frees_at_exit() -> None:
    """Let grain free the last batches' shared memory before the interpreter stops.

    Worker batches arrive in shared memory, which grain unlinks on a background thread when a
    batch is dropped. A run that ends right after its last batch (the final evaluation) used to exit
    with those requests still queued, and Python's resource tracker warned about "leaked
    shared_memory objects" (6-18 per run) that it then unlinked itself. Registered once, it runs
    before multiprocessing's own exit hook stops that thread; later frees happen synchronously.
    """
    def drain() -> None:
        array_type = grain.multiprocessing.SharedMemoryArray
        free_pool = getattr(array_type, "_del_thread_pool", None)
        if free_pool is None:
            return
        free_pool.close()
        free_pool.join()
        array_type._del_thread_pool = None  # later frees run in the caller
        array_type._outstanding_del_requests = None

    atexit.register(drain)


def to_iter_dataset(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """`ds` read in order by `num_workers` grain worker processes (0: in this process; AUTO_WORKERS:
    `worker_count`), each ending with its parent."""
    num_workers = worker_count(num_workers)
    ds = ds.to_iter_dataset(read_options=_READ_OPTIONS)
    if num_workers > 0:
        _finish_shared_memory_frees_at_exit()
        return ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers),
                              worker_init_fn=functools.partial(exit_with_parent, os.getpid()))
    return ds
