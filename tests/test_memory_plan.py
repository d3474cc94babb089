"""XLA's memory plan of the device suite's cases, compiled for devices without running on them (here
this machine's CPUs; GPUs need JAX's CUDA plugin, see BENCHMARKS.md for their tables)."""

import dataclasses
import re

import jax
import pytest
from jax.experimental import topologies

from gmae_jax.bench import cli, memory_plan, step_benchmark, suite_cases
from gmae_jax.bench.suite_cases import Case
from gmae_jax.train import sharding, trainer

CASE = Case(preset="micro", stage="pretrain", dtype="float32", batch_size=16, img_size=32, depth=1)


@pytest.fixture(scope="module")
def two_cpus():
    return memory_plan.target_devices("cpu", 2)


def test_the_abstract_state_is_the_state_a_run_creates(two_cpus):
    mesh = sharding.make_mesh(devices=two_cpus)
    model, init_inputs, _, run = step_benchmark.model_and_loss(suite_cases.architecture(CASE), "pretrain")
    real, _ = trainer.create_state(model, init_inputs, run, mesh, 1000)
    abstract = trainer.abstract_state(model, init_inputs, run, mesh, 1000)
    planned, made = (jax.tree.leaves_with_path(state) for state in (abstract, real))
    assert [path for path, _ in planned] == [path for path, _ in made]
    for (_, want), (_, got) in zip(planned, made):
        assert (want.shape, want.dtype, want.sharding) == (got.shape, got.dtype, got.sharding)
    assert sharding.bytes_per_device(abstract) == sharding.bytes_per_device(real) > 0


def test_plans_grow_with_the_batch_and_sharding_halves_the_large_arrays(two_cpus):
    # One test, so that every program compiled twice is a hit in the session's compilation cache.
    at_16, at_32 = (memory_plan.plan(dataclasses.replace(CASE, batch_size=b), two_cpus) for b in (16, 32))
    assert at_16.state_bytes == at_32.state_bytes > 0
    assert at_32.peak_bytes > at_16.peak_bytes > at_16.state_bytes
    split = memory_plan.plan(CASE, two_cpus, fsdp=2)
    assert split.state_bytes < at_16.state_bytes  # large arrays halved
    # The shard_map step holds the same state, and gathers the parameters for itself (bench --plan_step_impl).
    split_by_shard_map = memory_plan.plan(CASE, two_cpus, fsdp=2, step_impl="shard_map")
    assert split_by_shard_map.state_bytes == split.state_bytes < split_by_shard_map.peak_bytes != split.peak_bytes

    lines = list(memory_plan.plan_table([CASE], "cpu", num_devices=2))
    assert "fsdp=1, step_impl=jit, JAX" in lines[0]
    assert "no limit" in lines[0] and lines[0].endswith("; 1 case(s), each compiled twice")
    assert lines[1].startswith("| case |")
    cells = lines[2].strip("| ").split(" | ")
    assert cells[:3] == [CASE.name, "2", "16"]
    assert float(cells[4]) == pytest.approx(at_16.peak_bytes / 1e9, rel=0.01)  # not 0.00 at a small preset


@pytest.mark.parametrize("count, decimals, text", [
    (1.234e9, 2, "1.23"), (45.29e9, 2, "45.29"), (1.5e6, 2, "0.0015"), (0.754e9, 2, "0.754"), (0, 2, "0.00"),
    (0.0538e9, 3, "0.0538")])
def test_gigabytes_keep_three_significant_digits_below_one(count, decimals, text):
    assert memory_plan.gigabytes(count, decimals) == text


def planned_line(monkeypatch, per_image: int, bend_from: int | None = None) -> list[int]:
    """Plans on a line of `per_image` bytes per image (3 times as steep from `bend_from` images on) in
    place of compiled ones, so the search is checked on peaks known exactly; returns the batches planned."""
    planned = []

    def plan(case, devices, fsdp=1, step_impl="jit"):
        planned.append(case.batch_size)
        steeper = 2 * per_image * max(case.batch_size - bend_from, 0) if bend_from else 0
        return memory_plan.Plan(case.batch_size, 10**6, 10**6 + per_image * case.batch_size + steeper, 0.0)

    monkeypatch.setattr(memory_plan, "plan", plan)
    return planned


@pytest.mark.parametrize("bend_from", [None, 64], ids=["line", "bends"])
def test_the_largest_batch_that_fits_is_found_and_checked(monkeypatch, bend_from):
    planned = planned_line(monkeypatch, per_image=1000, bend_from=bend_from)
    # Room for 100 images on the line: the answer is not one of the two batches the line is drawn through.
    capacity = int((10**6 + 100 * 1000) / (1 - memory_plan.HEADROOM)) + 1
    best, plans = memory_plan.largest_batch(CASE, [None, None], capacity)
    limit = capacity * (1 - memory_plan.HEADROOM)
    # Multiples of 16 only: 96 on the line; where it bends, 96 misses and the line redrawn through
    # the plans at 32 and 96 gives 64.
    assert best.batch_size == (96 if bend_from is None else 64)
    assert best.peak_bytes <= limit and best in plans
    assert memory_plan.plan(dataclasses.replace(CASE, batch_size=best.batch_size + 16), [None, None]).peak_bytes > limit
    assert planned[:2] == [16, 32] and len(planned) == (4 if bend_from is None else 5)  # the miss at 96 redrawn


def test_no_batch_fits_below_the_state_and_the_search_stops_at_its_cap(monkeypatch):
    planned_line(monkeypatch, per_image=1000)
    nothing, plans = memory_plan.largest_batch(CASE, [None, None], capacity=10**6)
    assert nothing is None and [p.batch_size for p in plans] == [16, 32]
    capped, _ = memory_plan.largest_batch(CASE, [None, None], capacity=10**12, max_batch=40)
    assert capped.batch_size == 32  # the largest multiple of 16 up to the cap


@pytest.mark.parametrize("target, extra, error", [
    ("h100", "gpu-plan", NotImplementedError("topology not implemented for cuda")),
    ("v5e", "tpu", RuntimeError("Unable to initialize backend 'tpu'")),
])
def test_targets_without_their_plugin_say_what_to_install(monkeypatch, target, extra, error):
    def no_plugin(**kwargs):
        raise error

    monkeypatch.setattr(topologies, "get_topology_desc", no_plugin)
    with pytest.raises(memory_plan.PlanError, match=re.escape(f"pip install -e '.[{extra}]'")):
        memory_plan.target_devices(target, 1)
    with pytest.raises(memory_plan.PlanError, match="9 CPU devices wanted, 8 here"):
        memory_plan.target_devices("cpu", 9)


def test_gpu_plans_compile_with_cublas_gemms_and_no_autotuning_unless_the_flags_say_otherwise():
    assert memory_plan.with_gpu_plan_flags("") == "--xla_gpu_enable_triton_gemm=false --xla_gpu_autotune_level=0"
    assert memory_plan.with_gpu_plan_flags(" --xla_gpu_autotune_level=4  --xla_dump_to=/tmp/d") == (
        "--xla_gpu_autotune_level=4 --xla_dump_to=/tmp/d --xla_gpu_enable_triton_gemm=false")


def test_the_benchmark_offers_every_target():
    assert cli.PLAN_TARGETS == list(memory_plan.TARGETS)


def test_a_gpu_has_the_allocators_share_of_its_memory(monkeypatch):
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    assert memory_plan.device_capacity("h100") / 1e9 == pytest.approx(0.75 * 85.5, abs=0.1)  # 80 GB HBM3
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert memory_plan.device_capacity("h200") / 1e9 == pytest.approx(0.9 * 150.8, abs=0.1)  # 141 GB HBM3e
    assert memory_plan.device_capacity("v5e") == 16 * 2**30  # TPUs: the whole chip
    assert memory_plan.device_capacity("cpu") is None
