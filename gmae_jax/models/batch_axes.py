"""Which mesh axes split the batch inside a `shard_map` step, declared while that step is traced.

Under `jax.jit` the compiler sees the global batch, so BatchNorm statistics and random masks are
global by construction. Inside `shard_map` each device sees only its rows: BatchNorm must average
its statistics over the batch axes (`nn.BatchNorm(axis_name=...)`), and randomness drawn per
example must be drawn for the global batch and sliced, or every device would draw the same masks.
The same trace-time context approach as Flax's `nn.logical_axis_rules`: the model code stays free
of step-implementation arguments, and outside a shard_map step nothing changes.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator

import jax

AxisNames = tuple[str, ...]

_SPLIT_BATCH_AXES: contextvars.ContextVar[AxisNames | None] = contextvars.ContextVar(
    "gmae_split_batch_axes", default=None)


@contextlib.contextmanager
def batch_split_over(axes: AxisNames) -> Iterator[None]:
    """Declares, while a shard_map body is traced, that its batch is split over `axes`."""
    token = _SPLIT_BATCH_AXES.set(tuple(axes))
    try:
        yield
    finally:
        _SPLIT_BATCH_AXES.reset(token)


def batch_norm_axis() -> AxisNames | None:
    """The `axis_name` for BatchNorm: the split batch axes in a shard_map step, else None."""
    return _SPLIT_BATCH_AXES.get()


def global_rows(draw: Callable[[int], jax.Array], local_rows: int) -> jax.Array:
    """This device's rows of `draw(global_rows)`; just `draw(local_rows)` outside shard_map.

    Used for per-example randomness (masks) so that a shard_map step draws exactly what the jit
    step draws for the same global batch. Drawing the whole batch's noise on every device costs
    B x L uniforms, negligible next to the step.
    """
    axes = _SPLIT_BATCH_AXES.get()
    if axes is None:
        return draw(local_rows)
    shards = jax.lax.axis_size(axes)
    whole = draw(local_rows * shards)
    start = jax.lax.axis_index(axes) * local_rows
    return jax.lax.dynamic_slice_in_dim(whole, start, local_rows, axis=0)


def per_device_key(rng: jax.Array) -> jax.Array:
    """A key that differs between the devices of a shard_map step (dropout), unchanged outside."""
    axes = _SPLIT_BATCH_AXES.get()
    return rng if axes is None else jax.random.fold_in(rng, jax.lax.axis_index(axes))
