"""One pass over a run's evaluation split, batch by batch on the mesh: what training's evaluations and
the evaluate stage compute."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from gmae_jax.data import input_workers, pipeline, sources
from gmae_jax.train import sharding, tasks


# Each example's label, whether it is real or padding, and its place in the split: returned by the
# compiled eval step beside its results (`compile_eval_step`).
EXAMPLE_COLUMNS = ("label", "valid", "index")


def compile_eval_step(task: tasks.Task, mesh: jax.sharding.Mesh, state: Any) -> Callable:
    """`task.eval_step` compiled for the mesh, returning the batch's `EXAMPLE_COLUMNS` with its results,
    whole on every process. Gathered in the step's own program: a gather of its own per column (three
    more cross-process programs a batch) ran while the next batch's step was in flight, and XLA:CPU may
    run two programs' cross-process collectives in another order on each process, which hangs a
    multi-process job (as restoring's fingerprints did, session 36)."""
    def step(state: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        return {**task.eval_step(state, batch), **{key: batch[key] for key in EXAMPLE_COLUMNS}}

    return sharding.jit_eval_step(step, mesh, state)


def batch_size_for(batch_size: int, num_examples: int, mesh: jax.sharding.Mesh) -> int:
    """The batch an evaluation runs in: whole rows for every device, and no more than the split (the
    metrics do not depend on the batch; beyond the split it would hold only padding)."""
    return sharding.whole_rows(min(batch_size, max(num_examples, 1)), mesh)


def evaluate(
    task: tasks.Task, eval_step: Callable[[Any, dict[str, jax.Array]], dict[str, jax.Array]], state: Any,
    examples: sources.Source, *, image_size: int, batch_size: int, num_workers: int, mesh: jax.sharding.Mesh,
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """One pass over the evaluation split. Returns (metrics, per-example outputs of its valid examples).
    `state` is a TrainState or `setup.Weights`; `eval_step` returns scalar sums and per-example outputs,
    `EXAMPLE_COLUMNS` among them (`compile_eval_step`)."""
    batch_size = batch_size_for(batch_size, len(examples), mesh)
    dataset = pipeline.make_eval_dataset(
        examples, image_size=image_size, global_batch_size=batch_size, num_workers=num_workers,
        process_index=jax.process_index(), process_count=jax.process_count())
    sums: dict[str, float] = {}
    outputs: dict[str, list[np.ndarray]] = {key: [] for key in EXAMPLE_COLUMNS}

    def collect(results: dict[str, jax.Array]) -> None:
        for key, value in jax.device_get(results).items():
            if np.ndim(value) == 0:
                sums[key] = sums.get(key, 0.0) + float(value)
            else:
                outputs.setdefault(key, []).append(np.asarray(value))

    pending = None
    batches = iter(dataset)
    try:
        with input_workers.naming_dead_workers(num_workers):
            for host_batch in batches:
                # Dispatched before the previous batch's results are read: the device computes while the
                # host waits for them and loads the next batch.
                dispatched = eval_step(state, sharding.global_batch(host_batch, mesh))
                if pending is not None:
                    collect(pending)
                pending = dispatched
    finally:
        batches.close()  # its workers stop now, also when an error ends the process without exit hooks
    if pending is not None:
        collect(pending)
    stacked = {k: np.concatenate(v) for k, v in outputs.items() if v}
    keep = stacked.pop("valid") > 0
    if len(examples) and not keep.any():  # images that became unreadable since training checked them
        raise pipeline.BadImageBudgetError(pipeline.nothing_evaluable(len(examples), "replace them"))
    stacked = {k: v[keep] for k, v in stacked.items()}
    return task.summarize(sums, stacked), stacked
