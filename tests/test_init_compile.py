"""The initialiser compiles once per program in a process, and lowers threefry as a GPU kernel."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from gmae_jax.bench import step_benchmark
from gmae_jax.train import init_compile, sharding, trainer


def create(task="pretrain", **fields):
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "float32"), depth=1, **fields)
    model, init_inputs, _, run = step_benchmark.model_and_loss(config, task)
    return trainer.create_state(model, init_inputs, run, sharding.make_mesh(), 10)[0]


def test_variants_of_one_model_reuse_its_compiled_initialiser(monkeypatch):
    compiles = []
    compile_lowered = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *args, **kwargs: compiles.append(
        kwargs.get("compiler_options")) or compile_lowered(self, *args, **kwargs))
    monkeypatch.setattr(init_compile, "_compiled", type(init_compile._compiled)())  # start empty

    first = create()
    again = create(dtype="bfloat16", remat="block", conv_impl="matmul")  # the same parameters
    # Compiled once, for compile speed on this CPU (run once, its speed does not matter); XLA's
    # defaults on accelerators, where the option's effect is unmeasured.
    assert compiles == [{"xla_backend_optimization_level": 0}]
    assert init_compile.compile_options("gpu") == init_compile.compile_options("tpu") == {}
    for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(x, y)
    assert again.params is not first.params  # new buffers: a step may donate either state

    create(task="finetune")  # another model: its own program
    assert len(compiles) == 2


def test_a_reused_initialiser_hands_each_run_its_own_optimiser(monkeypatch):
    """Two runs of one model in a process (a study, a notebook, the test suite) share the
    initialiser's executable, but not the first run's optimiser: the second run used to get the
    first one's learning-rate schedule and trained at the wrong rate without a word."""
    compiles = []
    compile_lowered = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, *args, **kwargs: compiles.append(1) or compile_lowered(self, *args, **kwargs))
    monkeypatch.setattr(init_compile, "_compiled", type(init_compile._compiled)())
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "float32"), depth=1)
    model, init_inputs, _, run = step_benchmark.model_and_loss(config, "pretrain")
    faster = run.copy_and_resolve_references()
    faster.optim.update(lr=10 * run.optim.lr, min_lr=10 * run.optim.min_lr)

    states = [trainer.create_state(model, init_inputs, r, sharding.make_mesh(), 10)[0] for r in (run, faster)]
    assert len(compiles) == 1  # the second run reused the executable
    grads = jax.tree.map(np.ones_like, states[0].params)
    first, second = (jax.tree.leaves(s.tx.update(grads, s.opt_state, s.params)[0]) for s in states)
    for slow, fast in zip(first, second, strict=True):
        np.testing.assert_allclose(fast, 10 * slow, rtol=1e-5)

def test_initialiser_random_bits_lower_to_a_gpu_kernel():
    """Checked on the CUDA program this machine can lower without a GPU: threefry is a kernel call
    inside the context, unrolled rounds outside it."""
    def init(rng):
        return jax.random.normal(jax.random.fold_in(rng, 3), (4, 4))

    def cuda_text():
        return jax.jit(init).trace(jax.random.key(0)).lower(lowering_platforms=("cuda",)).as_text()

    assert "custom_call" not in cuda_text()  # threefry's rounds as plain ops
    with init_compile.threefry_as_gpu_kernel():
        inside = cuda_text()
    assert inside.count("stablehlo.custom_call @cu_threefry2x32") >= 2, inside[:2000]  # key and bits
    assert not jax.config.jax_threefry_gpu_kernel_lowering  # restored


def test_an_initialiser_that_does_not_compile_with_the_kernel_compiles_without_it(monkeypatch, caplog):
    """A GPU plugin without the threefry kernel must not cost a run (or a loan) its initialisation."""
    compile_lowered, failures = jax.stages.Lowered.compile, []

    def fail_once(self, *args, **kwargs):
        if not failures:
            failures.append(1)
            raise RuntimeError("UNIMPLEMENTED: no registered implementation for custom call cu_threefry2x32_ffi")
        return compile_lowered(self, *args, **kwargs)

    monkeypatch.setattr(jax.stages.Lowered, "compile", fail_once)
    monkeypatch.setattr(init_compile, "_compiled", type(init_compile._compiled)())
    monkeypatch.setattr(init_compile, "calls_threefry_kernel", lambda text: True)  # as a CUDA program would
    state = create()
    assert failures and all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert "did not compile with threefry as a GPU kernel (RuntimeError: UNIMPLEMENTED" in caplog.text

    # A program without the kernel call has nothing to fall back to: its error is the error.
    failures.clear()
    monkeypatch.setattr(init_compile, "calls_threefry_kernel", lambda text: False)
    monkeypatch.setattr(init_compile, "_compiled", type(init_compile._compiled)())
    with pytest.raises(RuntimeError, match="UNIMPLEMENTED"):
        create()


def test_the_kernel_call_is_recognised_in_a_cuda_program():
    def init(rng):
        return jax.random.normal(rng, (4,))

    with init_compile.threefry_as_gpu_kernel():
        cuda = jax.jit(init).trace(jax.random.key(0)).lower(lowering_platforms=("cuda",)).as_text()
    assert init_compile.calls_threefry_kernel(cuda)
    assert not init_compile.calls_threefry_kernel(jax.jit(init).lower(jax.random.key(0)).as_text())


def test_the_initialiser_is_traced_once_and_gives_the_values_of_a_plain_jit(monkeypatch):
    """Every run starts with the initialiser: its shardings come from the same trace as its program
    (the model's Flax init was traced twice, ~0.5 s of every `micro` start)."""
    traces = []

    def on_duration(event, seconds, fun_name=None, **_):
        if event.endswith("jaxpr_trace_duration"):
            traces.append(fun_name)

    monkeypatch.setattr(init_compile, "_compiled", type(init_compile._compiled)())
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "float32"), depth=1)
    model, init_inputs, _, run = step_benchmark.model_and_loss(config, "pretrain")
    init, _ = trainer._initialiser(model, init_inputs, run, 10)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 2, "fsdp": 4}))
    rng = jax.random.key(3)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    try:
        state = init_compile.compiled_initialiser(
            init, rng, lambda shapes: sharding.state_shardings(shapes, mesh), mesh)(rng)
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
    assert traces.count("init") == 1, traces
    plain = jax.jit(init)(rng)
    assert jax.tree.structure(state) == jax.tree.structure(plain)
    specs = [got.sharding.spec for got in jax.tree.leaves(state)]
    assert specs == [sharding.fsdp_spec(want.shape, 4) for want in jax.tree.leaves(plain)]
    assert any(spec != jax.sharding.PartitionSpec() for spec in specs)  # created split, not gathered
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
