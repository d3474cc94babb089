"""What this host gives the process: cores (what worker counts are sized by) and memory (what a batch
of images must fit in)."""

from __future__ import annotations

import os

from gmae_jax.schema import ConfigError


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one (taskset, a SLURM or
    container CPU set), all of the machine's otherwise."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pool_size(num_workers: int) -> int:
    """A stage's `config.num_workers` as the size of its own pool (prepare's processes, predict's
    decoding threads), read as the input pipeline reads it: -1 one per core this process may use
    (nothing else runs beside the pool), 0 none beside this process (a pool of one does that)."""
    return usable_cores() if num_workers == -1 else max(num_workers, 1)


def physical_memory() -> int | None:
    """Bytes of memory this machine has (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_batch_fits(batch_size: int, image_size: int, process_count: int, on_cpu: bool) -> None:
    """Stops with one line when one batch of `config.batch_size` images (split over `process_count` hosts)
    cannot fit in this host's memory. Its uint8 pixels are held on the host, and on CPU its float32 copy
    too (the device is the host there). Caught here, an extra zero in `--config.batch_size` is one line
    instead of an allocation that grows until the kernel kills the process."""
    memory = physical_memory()
    bytes_per_image = image_size * image_size * 3 * (1 + 4 * on_cpu)
    needed = -(-batch_size // process_count) * bytes_per_image
    if memory is None or needed <= memory:
        return
    raise ConfigError(f"config.batch_size={batch_size}: one batch of {image_size} px images needs "
                      f"{needed / 2**30:.0f} GiB of this host's memory, which has {memory / 2**30:.0f} GiB; use a "
                      f"batch far below {memory // bytes_per_image * process_count}")
