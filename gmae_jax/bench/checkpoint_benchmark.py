"""Checkpoint save time of a train state on all local devices, `python -m gmae_jax.bench
--checkpoint_save`: whole arrays (what a single-process run now writes) against orbax's
replica-parallel slices (its default), in one process.

Whole arrays go first, so one-time costs of the first save in a process (tensorstore, orbax's
threads) count against them; each save is timed to `wait_until_finished`, into a fresh folder.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Iterator

import jax

from gmae_jax.bench import step_benchmark
from gmae_jax.train import checkpoint

MODES = {"whole arrays": False, "replica-parallel": True}  # name -> orbax's use_replica_parallel
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


def save_seconds(preset: str, saves: int = 3, depth: int | None = None) -> dict[str, dict[str, float]]:
    """Per mode: the first save's seconds, the median of the later ones, and the XLA compiles the
    saves ran (replica-parallel slices each array on each device that holds a copy)."""
    architecture = step_benchmark.preset_architecture(preset, "float32", {} if depth is None else {"depth": depth})
    state = step_benchmark.build_train_step(architecture, "pretrain", jax.device_count()).state
    compiles: list[float] = []

    def count(name: str, seconds: float, **_: object) -> None:
        if name == _COMPILE_EVENT:
            compiles.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(count)
    results = {}
    try:
        for mode, replica_parallel in MODES.items():
            compiled_before = len(compiles)
            times = list(_timed_saves(state, saves, replica_parallel))
            results[mode] = {"first_s": times[0], "later_s": statistics.median(times[1:]) if saves > 1 else times[0],
                             "compiles": len(compiles) - compiled_before}
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
        # Back to make_manager's setting: off in one process; with several, orbax's default (on,
        # unless JAX_PLATFORMS names a GPU: that case is left on here).
        checkpoint.use_replica_parallel_saving(jax.process_count() > 1)
    return results


def _timed_saves(state: object, saves: int, replica_parallel: bool) -> Iterator[float]:
    with tempfile.TemporaryDirectory(prefix="gmae_jax_checkpoint_bench_") as folder:
        for index in range(saves):
            manager = checkpoint.make_manager(f"{folder}/{index}", max_to_keep=1)
            checkpoint.use_replica_parallel_saving(replica_parallel)
            start = time.perf_counter()
            checkpoint.save(manager, 1, state, None)
            manager.wait_until_finished()
            yield time.perf_counter() - start
            manager.close()


def markdown_table(preset: str, results: dict[str, dict[str, float]]) -> str:
    """`save_seconds`' results as the table BENCHMARKS.md quotes, with the two modes' time ratios."""
    whole, sliced = results["whole arrays"], results["replica-parallel"]
    lines = [f"`{preset}` train state on {jax.device_count()} x {jax.devices()[0].device_kind}, "
             f"{jax.process_count()} process(es), JAX {jax.__version__}",
             "", "| saving | first save s | later saves s (median) | XLA compiles |", "|---|---:|---:|---:|"]
    lines += [f"| {mode} | {r['first_s']:.2f} | {r['later_s']:.2f} | {r['compiles']} |" for mode, r in results.items()]
    lines += ["", f"replica-parallel / whole arrays: first save **{sliced['first_s'] / whole['first_s']:.2f}x**, "
                  f"later saves **{sliced['later_s'] / whole['later_s']:.2f}x** the time"]
    return "\n".join(lines)
