"""A fingerprint of every saved array, written beside the arrays and compared at restore.

Orbax checks none of an array's bytes (its zstd frames carry no checksum), so a flipped bit on disk
restored as other, often finite, values (e.g. -4.4e16 in a weight) that training, evaluation and the
export then used without a word. Each fingerprint is two wrapping uint32 sums over the array's
elements, of the element's bits times an odd weight of its index (which no single flipped bit leaves
unchanged) and of a mix of its bits and index. Sums do not depend on the order of the elements, so the
same array gives the same fingerprint however it is sharded: a checkpoint saved on one mesh checks on
another. Arrays on accelerators (or spread over processes) are summed where they live, without gathering
a sharded one; arrays in this host's memory by NumPy."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_GOLDEN = 0x9E3779B1  # odd: multiplying by it permutes the uint32s


def array_name(path: tuple[Any, ...]) -> str:
    """'params/encoder/blocks_0/...' for a leaf's path in a train state (or its metadata tree)."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", key))) for key in path)


def _mix(h, xp):
    """murmur3's finaliser: every input bit moves about half of the output bits."""
    h = h ^ (h >> xp.uint32(16))
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> xp.uint32(13))
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> xp.uint32(16))


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major position (wrapping at 2**32), built from per-axis counters so that a
    sharded array is never reshaped (which would gather it)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride % 2**32)
        stride *= shape[axis]
    return index


def _device_words(x: jax.Array) -> jax.Array:
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    if size in (4, 8):  # 8 bytes: a trailing axis of two words
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, {2: jnp.uint16, 1: jnp.uint8}[size]).astype(jnp.uint32)


def _host_words(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.bool_:
        return x.astype(np.uint32)
    size = x.dtype.itemsize
    x = np.ascontiguousarray(x)
    if size in (4, 8):
        return x.view(np.uint32).reshape(*x.shape, size // 4) if size == 8 else x.view(np.uint32)
    return x.view({2: np.uint16, 1: np.uint8}[size]).astype(np.uint32)


def _of_device_array(x: jax.Array) -> jax.Array:
    """The two sums: of each element's bits times an odd weight of its index, and of a mix of both."""
    words = _device_words(x)
    index = _flat_index(words.shape)
    weighted = words * (index * jnp.uint32(2) + jnp.uint32(1))
    mixed = _mix(_mix(index * jnp.uint32(_GOLDEN), jnp) ^ words, jnp)
    return jnp.stack([jnp.sum(weighted, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


@functools.cache
def _compiled(replicated: jax.sharding.Sharding | None):
    """One program per array shape, dtype and sharding (a program for all of a train state's ~600
    arrays at once took 7 s to compile on CPU; `mini`'s have 26 shapes, 2 s)."""
    return jax.jit(_of_device_array, out_shardings=replicated)


def _replicated_on(sharding: jax.sharding.Sharding) -> jax.sharding.Sharding | None:
    """Where an array's fingerprint lands: on every device of its mesh, so every process can read it."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    return None


def _on_cpu(leaf: jax.Array) -> bool:
    return all(device.platform == "cpu" for device in leaf.sharding.device_set)


def _across_cpu_processes(leaf: jax.Array) -> bool:
    """An array on CPU devices of several processes: its sums are collectives over Gloo, and XLA:CPU
    runs programs whose inputs are ready in any order, not in the order they were dispatched. Two
    such programs in flight at once can each wait in its collective for a device of the other
    process that runs the other program first: a resumed two-process FSDP job hung there (before its
    first step). GPUs run a device's programs in dispatch order."""
    return not leaf.is_fully_addressable and _on_cpu(leaf)


def _on_host(leaf: Any) -> bool:
    """NumPy values and whole arrays in this host's memory are summed by NumPy: no compile, no copy."""
    if not isinstance(leaf, jax.Array):
        return True
    return leaf.is_fully_addressable and _on_cpu(leaf)


_HOST_CHUNK = 1 << 16  # elements: a chunk's temporaries stay in the cache (25 M floats: 0.11 s, whole 0.42 s)


def _of_host_array(x: np.ndarray) -> np.ndarray:
    """`_of_device_array`'s sums by NumPy, over the array in row-major order, a chunk at a time."""
    words = _host_words(x).reshape(-1)  # row-major, as the device's flat index counts
    sums = np.zeros(2, np.uint32)
    for start in range(0, words.size, _HOST_CHUNK):
        chunk = words[start:start + _HOST_CHUNK]
        index = np.arange(start, start + chunk.size, dtype=np.uint64).astype(np.uint32)  # wraps at 2**32
        weighted = index * np.uint32(2)
        weighted += np.uint32(1)
        weighted *= chunk
        index *= np.uint32(_GOLDEN)
        mixed = _mix(_mix(index, np) ^ chunk, np)
        sums += np.array([weighted.sum(dtype=np.uint32), mixed.sum(dtype=np.uint32)], np.uint32)
    return sums


def _label(dtype: Any, sums: np.ndarray) -> str:
    return f"{np.dtype(dtype).name} {int(sums[0]):08x}{int(sums[1]):08x}"


def of(tree: Any) -> dict[str, str]:
    """{array name: 'dtype fingerprint'} for every array leaf of `tree` (jax or NumPy arrays). Every
    process of a job must call it for the same tree (a sharded array's sums are collectives)."""
    on_device = {}
    fingerprints = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if _on_host(leaf):
            leaf = np.asarray(leaf)
            fingerprints[array_name(path)] = _label(leaf.dtype, _of_host_array(leaf))
        else:  # dispatched one after another; read back together
            sums = _compiled(_replicated_on(leaf.sharding))(leaf)
            if _across_cpu_processes(leaf):  # read before the next is dispatched: see _across_cpu_processes
                sums = np.asarray(sums)
            on_device[array_name(path)] = (leaf.dtype, sums)
    fingerprints.update({name: _label(dtype, np.asarray(sums)) for name, (dtype, sums) in on_device.items()})
    return dict(sorted(fingerprints.items()))


def differing(saved: Mapping[str, str], restored: Mapping[str, str]) -> list[str]:
    """The arrays of both whose fingerprints differ, where both have the same dtype (an array restored
    into another dtype was converted, not damaged)."""
    return [name for name in sorted(set(saved) & set(restored))
            if saved[name] != restored[name] and saved[name].split()[0] == restored[name].split()[0]]
