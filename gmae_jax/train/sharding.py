"""Device mesh and shardings: data parallel over a `data` axis, parameters replicated.

Sharding is declared here and nowhere else; a later FSDP or shard_map variant replaces these
functions without touching the pure steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all devices of all processes (Auto axes, as jit-with-shardings expects)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array sharded on `data`."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a batch-sharded array as numpy on every process (`device_get` refuses arrays
    that span other processes' devices)."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def jit_train_step(step_fn: Callable, mesh: Mesh, state: Any) -> Callable:
    """`step_fn(state, batch, rng)` compiled with replicated state, sharded batch, donated state."""
    state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )


def jit_eval_step(step_fn: Callable, mesh: Mesh, state: Any) -> Callable:
    """`step_fn(state, batch)` compiled with replicated outputs (host-readable on every process)."""
    state_sharding = jax.tree.map(lambda _: replicated(mesh), state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
