"""Device mesh and shardings, declared here and nowhere else.

A `(data, fsdp)` mesh over all devices of all processes. The batch is split over every axis;
every large array of the train state (parameters and their AdamW moments alike) is split `fsdp`
ways on its largest divisible dimension, small ones are replicated (the FSDP rule big_vision and
MaxText use, inferred from shapes so that no module has to name its axes). With `fsdp=1` this is
plain data parallelism.

G-MAE's widths are odd (MSC-FFN's 2 x width + 1 and its multiples: `reference`'s 2049 x 8196), so
`fsdp=8` divides none of such an array's dimensions. The `fsdp` axis is therefore laid out as one
mesh axis per prime factor (8 -> `fsdp_0, fsdp_1, fsdp_2`, each of 2; a prime `fsdp` stays one axis
named `fsdp`), and an array that the whole axis cannot split is split on the dimension that the
most of its factors divide (8196 = 4 x 2049: four ways), replicated over the rest.

The pure steps in `gmae_jax.train.steps` know nothing of this; they run under `jax.jit` with these
shardings (XLA inserts the all-gathers and reduce-scatters), or under `shard_map` with explicit
collectives (`shard_map_train_step`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gmae_jax.models import batch_axes
from gmae_jax.train import steps

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# Arrays smaller than this stay replicated: splitting them saves little memory and costs a collective.
MIN_FSDP_SIZE = 2**12


class MeshError(ValueError):
    """A mesh shape that does not fit the devices; the message says what to set."""


def mesh_shape(data: int, fsdp: int, num_devices: int) -> tuple[int, int]:
    """Resolves one `-1` entry of (data, fsdp) so that data * fsdp == num_devices."""
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value < 1 and value != -1:
            raise MeshError(f"config.mesh.{name}={value} must be a positive number of devices, or -1 to fill the rest")
    if data == -1 and fsdp == -1:
        raise MeshError(f"config.mesh.fsdp=-1 fills the devices, and so does config.mesh.data (its default, -1): set "
                        f"it, e.g. --config.mesh.data=1 for FSDP over all {num_devices} devices")
    if data == -1 or fsdp == -1:
        name, known = ("fsdp", fsdp) if data == -1 else ("data", data)
        if known < 1 or num_devices % known:
            devices = f"{num_devices} device" + ("s" if num_devices != 1 else "")
            raise MeshError(f"config.mesh.{name}={known} does not divide the {devices} of this job; "
                            f"use a divisor of {num_devices}")
        return (num_devices // known, known) if data == -1 else (known, num_devices // known)
    if data < 1 or fsdp < 1 or data * fsdp != num_devices:
        raise MeshError(f"config.mesh.data={data} x config.mesh.fsdp={fsdp} must equal the {num_devices} "
                        "devices; set one of them to -1 to fill the rest")
    return data, fsdp


def prime_factors(n: int) -> tuple[int, ...]:
    """`n`'s prime factors, smallest first, with repeats (8 -> 2, 2, 2); none for 1."""
    factors, p = [], 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    return tuple(factors)


def fsdp_axes(fsdp_size: int) -> dict[str, int]:
    """The mesh axes that make up `fsdp`, name -> size: one per prime factor, or one `fsdp` axis where
    there is at most one factor (the whole axis, or plain data parallelism at 1)."""
    factors = prime_factors(fsdp_size)
    if len(factors) <= 1:
        return {FSDP_AXIS: fsdp_size}
    return {f"{FSDP_AXIS}_{i}": factor for i, factor in enumerate(factors)}


def fsdp_size(mesh: Mesh) -> int:
    """How many ways the mesh's FSDP axes split an array that all of them divide."""
    return mesh.size // mesh.shape[DATA_AXIS]


def make_mesh(mesh: ml_collections.ConfigDict | None = None, devices: list[jax.Device] | None = None) -> Mesh:
    """The `(data, fsdp)` mesh of `config.mesh` (default: all devices on `data`), Auto axes, with
    `fsdp` laid out as its factors' axes (`fsdp_axes`).

    Devices are laid out by `mesh_utils`, so on TPU slices and GPU hosts the `fsdp` axis (the one
    with the most traffic) runs over the fastest links; on CPU it is the process-major order. Its
    factors' axes split it row-major, so the devices of each factor's group stay neighbours.
    """
    devices = jax.devices() if devices is None else devices
    data, fsdp = mesh_shape(mesh.data if mesh else -1, mesh.fsdp if mesh else 1, len(devices))
    try:
        grid = mesh_utils.create_device_mesh((data, fsdp), devices, allow_split_physical_axes=True)
    except (AssertionError, NotImplementedError, ValueError):  # topologies mesh_utils cannot map
        grid = np.asarray(devices).reshape(data, fsdp)
    axes = fsdp_axes(fsdp)
    return Mesh(grid.reshape(data, *axes.values()), (DATA_AXIS, *axes))


def describe(mesh: Mesh) -> str:
    """'data=2 x fsdp=4 (axes fsdp_0=2 x fsdp_1=2)': the config's two numbers, and the axes behind them."""
    text = f"{DATA_AXIS}={mesh.shape[DATA_AXIS]} x {FSDP_AXIS}={fsdp_size(mesh)}"
    factors = [name for name in mesh.axis_names if name != DATA_AXIS]
    if factors != [FSDP_AXIS]:
        text += " (axes " + " x ".join(f"{name}={mesh.shape[name]}" for name in factors) + ")"
    return text


def batch_axes_of(mesh: Mesh) -> tuple[str, ...]:
    """The axes the batch is split over: all of them, `data` first."""
    return tuple(mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(batch_axes_of(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _entry(names: list[str]) -> str | tuple[str, ...] | None:
    return None if not names else names[0] if len(names) == 1 else tuple(names)


def _dividing_factors(size: int, axes: dict[str, int]) -> list[str]:
    """The factor axes that split a dimension of `size` together, taken greedily in order."""
    names, ways = [], 1
    for name, factor in axes.items():
        if size % (ways * factor) == 0:
            names.append(name)
            ways *= factor
    return names


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Split the largest dimension that `fsdp_size` divides; where none does, the one dimension that
    the most of its factors' axes divide (the last of equals: a kernel's output features); replicate
    small arrays. One dimension only: a kernel split on its input and output features both made XLA's
    partitioner replicate the activation it multiplies (BENCHMARKS.md, "FSDP of G-MAE's odd widths")."""
    if fsdp_size == 1 or math.prod(shape) < MIN_FSDP_SIZE:
        return P()
    axes = fsdp_axes(fsdp_size)
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            return P(*([None] * dim), _entry(list(axes)))
    splits = [_dividing_factors(size, axes) for size in shape]
    dim = max(range(len(shape)), key=lambda d: (math.prod(axes[name] for name in splits[d]), d))
    return P(*([None] * dim), _entry(splits[dim])) if splits[dim] else P()


def _axes_of(spec: P) -> tuple[str, ...]:
    """The mesh axes a `PartitionSpec` splits over, major first."""
    entries = [(entry,) if isinstance(entry, str) else entry for entry in spec if entry is not None]
    return tuple(name for entry in entries for name in entry)


def split_ways(spec: P, fsdp_size: int) -> int:
    """How many shards `fsdp_spec` cut an array into (1: replicated)."""
    sizes = fsdp_axes(fsdp_size)
    return math.prod(sizes[name] for name in _axes_of(spec))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Shardings for every array of a (possibly abstract) train state, by the FSDP rule."""
    size = fsdp_size(mesh)
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), size)), abstract_state)


def sharded_abstract_state(abstract_state: Any, mesh: Mesh) -> Any:
    """`abstract_state`'s shapes and dtypes with `state_shardings`: what a step compiles, or a
    checkpoint restores, for without an array."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract_state, state_shardings(abstract_state, mesh))


def bytes_per_device(tree: Any) -> int:
    """Bytes that the largest share of `tree`'s arrays (or abstract arrays) occupies on one device;
    an abstract array without a sharding counts whole."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array | jax.ShapeDtypeStruct):
            shape = leaf.shape if leaf.sharding is None else leaf.sharding.shard_shape(leaf.shape)
            total += math.prod(shape) * leaf.dtype.itemsize
    return total


def _ways(shape: tuple[int, ...], fsdp_size: int) -> int:
    """How many shards the FSDP rule cuts an array of `shape` into for `fsdp_size`."""
    return split_ways(fsdp_spec(shape, fsdp_size), fsdp_size)


def _bytes_at(tree: Any, fsdp_size: int) -> float:
    """Bytes of `tree`'s arrays on one device if the FSDP rule split them for `fsdp_size`."""
    return sum(math.prod(np.shape(x)) * np.dtype(x.dtype).itemsize / _ways(np.shape(x), fsdp_size)
               for x in jax.tree.leaves(tree))


def _split_less(x: Any, fsdp_size: int) -> bool:
    """A large array that the FSDP rule splits fewer than `fsdp_size` ways."""
    return math.prod(np.shape(x)) >= MIN_FSDP_SIZE and _ways(np.shape(x), fsdp_size) < fsdp_size


def fsdp_split_less_warning(state: Any, params: Any, fsdp_size: int, num_devices: int) -> str | None:
    """A start-up warning where arrays that the FSDP rule splits fewer than `fsdp` ways are a tenth of
    the state a device holds or more: an array is split only as far as its dimensions divide, and G-MAE's
    MSC-FFN sizes (2 x width + 1, its multiples) often leave little (`small`'s fc1 kernels are 513 x 2052:
    four ways at fsdp=8, as 2052 = 4 x 513). Says which `fsdp` among the divisors of `num_devices`
    holds the least per device, where another does."""
    if fsdp_size == 1:
        return None
    less = [x for x in jax.tree.leaves(state) if _split_less(x, fsdp_size)]
    less_bytes, total = _bytes_at(less, fsdp_size), _bytes_at(state, fsdp_size)
    if less_bytes < 0.1 * total:
        return None
    named = sorted(((jax.tree_util.keystr(path, simple=True, separator="."), np.shape(x))
                    for path, x in jax.tree.leaves_with_path(params) if _split_less(x, fsdp_size)),
                   key=lambda item: -math.prod(item[1]))  # the largest first
    example = ""
    if named:
        name, shape = named[0]
        ways = _ways(shape, fsdp_size)
        example = f", e.g. params {name} {shape}: " + ("whole" if ways == 1 else f"{ways} ways")
    message = (f"config.mesh.fsdp={fsdp_size} splits an array only as far as its dimensions divide: "
               f"{less_bytes / 2**20:.1f} MB a device of parameters and optimiser state are split fewer than "
               f"{fsdp_size} ways ({len(less)} array(s){example}), {total / 2**20:.1f} MB a device in all")
    best_bytes, best = min((_bytes_at(state, d), d) for d in range(1, num_devices + 1) if num_devices % d == 0)
    if best_bytes < 0.95 * total:
        message += f"; --config.mesh.fsdp={best} would hold {best_bytes / 2**20:.1f} MB a device"
    return message


def global_batch(host_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's slice of the batch into one global array split over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in host_batch.items()}


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a batch-sharded array as numpy on every process (`device_get` refuses arrays
    that span other processes' devices)."""
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def whole_rows(batch_size: int, mesh: Mesh) -> int:
    """`batch_size` rounded up to a multiple of the mesh's devices, so each gets whole rows (for
    evaluation and prediction, whose last batch is padded anyway)."""
    return math.ceil(batch_size / mesh.size) * mesh.size


def tree_to_host(tree: Any) -> Any:
    """Every array of `tree` whole, as numpy, on this process. Arrays split over several processes'
    devices (FSDP across hosts) are gathered, a collective: every process must call it."""
    def whole(x: Any) -> Any:
        if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
            return jax.device_get(x)
        return to_host(x)

    return jax.tree.map(whole, tree)


def _shardings_of(state: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, state)


def jit_train_step(step_fn: Callable, mesh: Mesh, state: Any) -> Callable:
    """`step_fn(state, batch, rng)` compiled for the state's shardings, a split batch, donated state."""
    state_sharding = _shardings_of(state)
    return jax.jit(
        step_fn,
        in_shardings=(state_sharding, batch_sharding(mesh), replicated(mesh)),
        out_shardings=(state_sharding, replicated(mesh)),
        donate_argnums=(0,),
    )


def shard_map_train_step(loss_fn: steps.LossFn, mesh: Mesh, state: Any, accum_steps: int = 1) -> Callable:
    """The same optimiser step with the gradient computed under `shard_map` with explicit collectives.

    Each device takes its own shards of the parameters (their FSDP layout, as stored) and its own
    rows of the batch, `all_gather`s the parameters whole inside the loss and differentiates the mean
    loss of its rows. The gradient of an `all_gather` is a `psum_scatter`, so each device gets back
    the sum of every device's gradient for its own shard, never the whole gradient; a sum over the
    axes a parameter is not split on and the division by the device count make it the global-batch
    mean (replicated parameters: a `pmean`). BatchNorm averages its statistics over the batch axes
    (`batch_axes.batch_split_over`), so normalisation and running averages are global-batch ones,
    as under jit. `check_vma=False` keeps gradients local until these explicit collectives (with it
    on, JAX would already sum the replicated parameters' over devices, counting them twice). The
    optimiser update runs outside, on the shards where they lie.
    """
    split_over = batch_axes_of(mesh)
    param_specs = jax.tree.map(lambda x: x.sharding.spec, state.params)

    def whole_loss(param_shards, *args):
        return loss_fn(jax.tree.map(_gather_whole, param_shards, param_specs), *args)

    def global_mean(grad, spec):
        unsplit = tuple(axis for axis in mesh.axis_names if axis not in _axes_of(spec))
        return (jax.lax.psum(grad, unsplit) if unsplit else grad) / mesh.size

    def local_gradients(param_shards, batch_stats, batch, rng):
        with batch_axes.batch_split_over(split_over):
            grads, metrics, batch_stats = steps.loss_gradients(
                param_shards, batch_stats, batch, rng, loss_fn=whole_loss, accum_steps=accum_steps)
        return jax.tree.map(global_mean, grads, param_specs), jax.lax.pmean((metrics, batch_stats), split_over)

    gradients = jax.shard_map(local_gradients, mesh=mesh, in_specs=(param_specs, P(), P(split_over), P()),
                              out_specs=(param_specs, P()), check_vma=False)

    def step(state, batch, rng):
        step_rng = jax.random.fold_in(rng, state.step)
        grads, (metrics, batch_stats) = gradients(state.params, state.batch_stats, batch, step_rng)
        return steps.apply_gradients(state, grads, metrics, batch_stats)

    return jit_train_step(step, mesh, state)


def _gather_whole(shard: jax.Array, spec: P) -> jax.Array:
    """Inside `shard_map`: the whole array from this device's shard of it, laid out by `spec`."""
    for dim, entry in enumerate(spec):
        if entry is not None:
            shard = jax.lax.all_gather(shard, entry, axis=dim, tiled=True)
    return shard


def make_train_step(impl: str, loss_fn: steps.LossFn, mesh: Mesh, state: Any, accum_steps: int = 1) -> Callable:
    """The compiled train step of `config.step_impl`: 'jit' (XLA partitions) or 'shard_map'."""
    if impl == "shard_map":
        return shard_map_train_step(loss_fn, mesh, state, accum_steps)
    return jit_train_step(functools.partial(steps.train_step, loss_fn=loss_fn, accum_steps=accum_steps),
                          mesh, state)


def jit_eval_step(step_fn: Callable, mesh: Mesh, state: Any) -> Callable:
    """`step_fn(state, batch)` compiled with replicated outputs (host-readable on every process)."""
    return jax.jit(
        step_fn,
        in_shardings=(_shardings_of(state), batch_sharding(mesh)),
        out_shardings=replicated(mesh),
    )
