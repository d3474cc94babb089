"""The parameter initialiser's compile, made cheap: compiled once per program in a process, and with
its random bits lowered as one GPU kernel per call.

Why: initialising draws every parameter's key and bits with threefry, whose 20 rounds XLA inlines
at each of the hundreds of call sites (the forward pass itself is pruned before XLA sees it). On
this project's 2-core CPU the initialiser alone compiles in 7.6 s for `micro`, ~20 s for `small`
and 44 s for `reference` at 224 px, ~40 % of it threefry (BENCHMARKS.md, session 9). Variants of
one model (dtype, remat, conv_impl: the device suite's cases; a study's fine-tunes) initialise the
same parameters, so the program is the same and its executable can be reused. On GPUs, JAX can
lower threefry to a kernel call instead ("makes compile times faster", its flag's help says); the
bits are the same threefry bits, other backends ignore the flag, and an initialiser runs once, so
its run-time cost does not matter; where the kernel call does not compile, XLA's threefry is used
(with a warning). For the same reason XLA:CPU compiles it without LLVM's optimisations: `micro`
7.3 -> 3.0 s, `small` at 224 px 18.5 -> 11.8 s (its run 0.2 -> 1.8 s, once); values move by an ulp at
most (erf_inv's float arithmetic), the same way on every run of the program.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend
from absl import logging

_THREEFRY_KERNEL_FLAG = "jax_threefry_gpu_kernel_lowering"
_CACHE_SIZE = 4  # a few models per process; each entry holds one executable
_compiled: collections.OrderedDict[tuple[str, tuple[int, ...]], Any] = collections.OrderedDict()


@contextlib.contextmanager
def threefry_as_gpu_kernel() -> Iterator[None]:
    """While tracing, threefry lowers to one GPU kernel per call (where this JAX has the flag)."""
    previous = getattr(jax.config, _THREEFRY_KERNEL_FLAG, None)
    if previous is None:
        yield
        return
    jax.config.update(_THREEFRY_KERNEL_FLAG, True)
    try:
        yield
    finally:
        jax.config.update(_THREEFRY_KERNEL_FLAG, previous)


def calls_threefry_kernel(program_text: str) -> bool:
    """Whether a lowered program calls the GPU threefry kernel (CUDA or ROCm)."""
    return re.search(r"custom_call @\w*threefry", program_text) is not None


def compile_options(platform: str) -> dict[str, Any]:
    """XLA options for an initialiser on `platform`: run once, so compiled for compile speed on CPU."""
    return {"xla_backend_optimization_level": 0} if platform == "cpu" else {}


def compiled_initialiser(init: Callable[[jax.Array], Any], rng: jax.Array, shardings_of: Callable[[Any], Any],
                         mesh: jax.sharding.Mesh) -> Any:
    """`jax.jit(init, out_shardings=shardings_of(init's output shapes))` compiled for `rng`, reusing the
    executable of an identical program (same lowered text, same devices) compiled earlier in this process.

    `init` is traced once: the shardings come from that trace's output shapes and the compiled program
    replays its jaxpr (tracing the model's initialiser is ~0.5 s for `micro`, and every run starts with it).

    The arrays come from the cached executable, the pytree around them from this call's `init`: an
    executable returns the output structure it was traced with, static fields included (a
    TrainState's `tx` and `apply_fn`), and the program's text does not show them (an optimiser's
    learning-rate schedule leaves AdamW's initial state unchanged). Returning the first caller's
    structure gave a second run in one process the first run's optimiser."""
    with threefry_as_gpu_kernel():
        traced = jax.jit(init).trace(rng)
    out_shardings = jax.tree.leaves(shardings_of(traced.out_info))
    replay_jaxpr = jax.extend.core.jaxpr_as_fun(traced.jaxpr)

    def initialise_parameters(key: jax.Array) -> list[jax.Array]:  # the name XLA and its logs show
        return replay_jaxpr(key)

    replay = jax.jit(initialise_parameters, out_shardings=out_shardings)
    with threefry_as_gpu_kernel():
        lowered = replay.lower(rng)
    text = lowered.as_text()
    key = (hashlib.sha256(text.encode()).hexdigest(), tuple(int(d.id) for d in mesh.devices.flat))
    if key in _compiled:
        _compiled.move_to_end(key)
        return _with_structure(_compiled[key], traced.out_tree)
    options = compile_options(mesh.devices.flat[0].platform)
    try:
        executable = lowered.compile(compiler_options=options)
    except Exception as error:
        if not calls_threefry_kernel(text):
            raise
        # e.g. a GPU plugin without the kernel: XLA's own threefry then
        logging.warning("the parameter initialiser did not compile with threefry as a GPU kernel (%s: %s); "
                        "compiling it with XLA's threefry", type(error).__name__, str(error).splitlines()[0][:200])
        executable = replay.lower(rng).compile(compiler_options=options)
    _compiled[key] = executable
    while len(_compiled) > _CACHE_SIZE:
        _compiled.popitem(last=False)
    return _with_structure(executable, traced.out_tree)


def _with_structure(executable: Any, out_tree: Any) -> Callable[..., Any]:
    """`executable` whose outputs are put in `out_tree` (the same leaves in the same order)."""
    return lambda *args: jax.tree.unflatten(out_tree, jax.tree.leaves(executable(*args)))
