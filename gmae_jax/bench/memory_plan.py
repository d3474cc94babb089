"""Device memory of a train step, planned by XLA's compiler for devices this machine need not have.

A case of the device suite that does not fit costs a GPU loan a whole compile (a minute or more at
224 px) before its batch is halved, and whether the 1.3 B `reference` model trains on one GPU, or on
16 GB TPU chips, and what FSDP over eight leaves on each, are questions about memory, not speed. XLA
compiles for devices it is only told of (deviceless ahead-of-time compilation:
`jax.experimental.topologies`; for GPUs a target description and JAX's CUDA plugin,
`pip install -e '.[gpu-plan]'`; for TPUs libtpu, `pip install -e '.[tpu]'`; no device or driver),
and the compiled program's `memory_analysis` is the buffer plan the device would run:
parameters, optimiser state and batch, plus every temporary (the activations kept for the backward
pass among them). The plan grows linearly in the batch, so two compiles give the largest batch that
fits and a third checks it.

Nothing is allocated: the train state is abstract (`trainer.abstract_state`), so `reference`'s
16 GB of float32 weights and AdamW moments need not fit in this machine's memory either.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterator, Sequence

import jax
import ml_collections
from jax.experimental import topologies

from gmae_jax.models import fast_conv
from gmae_jax.bench import device_suite, step_benchmark, suite_cases
from gmae_jax.train import sharding, trainer

# Descriptions of GPUs for XLA's compiler (its GpuTargetConfig): what it would otherwise query from
# the device. The figures are NVIDIA's published ones for the SXM parts (compute capability 9.0).
_HOPPER = """
gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{name}"
"""


@dataclasses.dataclass(frozen=True)
class Target:
    """A kind of device to plan for: how XLA is told of it, and its memory per device."""

    platform: str  # 'cpu', 'cuda' or 'tpu'
    memory_bytes: int | None = None  # None: this machine's host memory, no limit
    gpu_config: str = ""  # XLA's GpuTargetConfig (GPUs)
    tpu_host: str = ""  # the topology of one host (TPUs); plans use its first devices

    @property
    def extra(self) -> str:
        return {"cuda": "gpu-plan", "tpu": "tpu"}.get(self.platform, "")


TARGETS = {
    "cpu": Target("cpu"),
    # Memory: the total nvidia-smi reports (81,559 and 143,771 MiB), which JAX's allocator takes its share of.
    "h100": Target("cuda", 81_559 * 2**20, _HOPPER.format(
        name="NVIDIA H100 80GB HBM3", memory=81_559 * 2**20, bandwidth=3_352_320_000_000)),
    "h200": Target("cuda", 143_771 * 2**20, _HOPPER.format(
        name="NVIDIA H200", memory=143_771 * 2**20, bandwidth=4_800_000_000_000)),
    # HBM per chip: 16 GiB (v5e), 32 GiB (v6e), 95 GiB (v5p); 8 chips a host (v5p: 4).
    "v5e": Target("tpu", 16 * 2**30, tpu_host="v5e:2x4"),
    "v6e": Target("tpu", 32 * 2**30, tpu_host="v6e:2x4"),
    "v5p": Target("tpu", 95 * 2**30, tpu_host="v5p:2x2x1"),
}
# JAX's allocator takes this share of a GPU's memory at start-up (XLA_PYTHON_CLIENT_MEM_FRACTION);
# a step has that much, not the whole device. TPUs give a program their whole memory.
DEFAULT_GPU_MEM_FRACTION = 0.75
# Plans leave this share of the allocator's memory free: fragmentation, what runs beside the step
# (input batches in flight, checkpoint copies), and the plan's own error: `small`'s bf16 pretraining
# step at batch 256 plans 14.5 GB for an H100 with cuDNN convolutions, where an H200 measured a peak
# of 15.8 GB in use (BENCHMARKS.md, sessions 8 and 18). The device suite's estimates keep the same.
HEADROOM = device_suite.HEADROOM
# Where the search for the largest batch stops: past it a step's images/s no longer grows on any
# accelerator this project targets, and compiles grow (a small model at 32 px would fit ~10^5).
MAX_BATCH = device_suite.MAX_BATCH


class PlanError(RuntimeError):
    """The plan asked for cannot be made here (no plugin for the target, too few devices); the
    message says what to change."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """XLA's buffer plan for one device of a case's compiled train step."""

    batch_size: int
    state_bytes: int  # parameters, BatchNorm statistics and optimiser state held between steps
    peak_bytes: int  # arguments + outputs not aliased to them + temporaries
    compile_s: float


# JAX's CUDA plugin refuses to load where no CUDA runtime is installed unless this is set when JAX
# starts its backends (before the process's first computation).
CUDA_CHECK_OFF = "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1"
# XLA:GPU flags a plan is compiled with where XLA_FLAGS names neither (also set before JAX starts): GEMMs
# on cuBLAS, as `launch/bench_device.sh` runs them, and no autotuning, which needs a device. Without
# them XLA's Triton tiling failed to compile `small`'s GEMMs for an H100 (JAX 0.10.2: "Couldn't find
# output tile sizes"; FSDP's also with Triton GEMMs off); `small`'s plan is the same with or without
# the autotuner's level (BENCHMARKS.md, session 37).
GPU_PLAN_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")


def with_gpu_plan_flags(xla_flags: str) -> str:
    """`xla_flags` with each of `GPU_PLAN_FLAGS` whose flag it does not set already."""
    named = {flag.split("=")[0] for flag in xla_flags.split()}
    missing = [flag for flag in GPU_PLAN_FLAGS if flag.split("=")[0] not in named]
    return " ".join([*xla_flags.split(), *missing])


def target_devices(target: str, num_devices: int) -> list[jax.Device]:
    """`num_devices` devices of one host of `target`: this machine's own for 'cpu', else devices
    described to the compiler (they can be compiled for, not run on)."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    kind = TARGETS[target]
    if kind.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < num_devices:
            raise PlanError(f"{num_devices} CPU devices wanted, {len(devices)} here "
                            f"(XLA_FLAGS=--xla_force_host_platform_device_count={num_devices})")
        return devices[:num_devices]
    try:
        if kind.platform == "cuda":
            topology = topologies.get_topology_desc(platform="cuda", target_config=kind.gpu_config,
                                                    topology=f"1x1x{num_devices}")
        else:
            topology = topologies.get_topology_desc(topology_name=kind.tpu_host, platform="tpu")
    except (NotImplementedError, RuntimeError) as error:
        no_cuda = (f"; without CUDA installed, also {CUDA_CHECK_OFF} before JAX starts (bench --suite=memory "
                   "sets it)") if kind.platform == "cuda" else ""
        raise PlanError(
            f"cannot compile for {target} on this machine ({str(error).splitlines()[0][:200]}); planning for "
            f"{target} needs JAX's {kind.platform.upper()} plugin (no device or driver): "
            f"pip install -e '.[{kind.extra}]'{no_cuda}") from error
    if len(topology.devices) < num_devices:
        raise PlanError(f"one {target} host has {len(topology.devices)} devices; {num_devices} wanted")
    return list(topology.devices)[:num_devices]


def device_capacity(target: str) -> int | None:
    """Bytes a step may plan for on one `target` device; None for this machine's CPU (no limit)."""
    kind = TARGETS[target]
    if kind.memory_bytes is None or kind.platform != "cuda":
        return kind.memory_bytes
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", DEFAULT_GPU_MEM_FRACTION))
    return int(kind.memory_bytes * fraction)


def plan(case: suite_cases.Case, devices: Sequence[jax.Device], fsdp: int = 1, step_impl: str = "jit") -> Plan:
    """Compiles `case`'s train step (as the device suite runs it, or as `config.step_impl=step_impl`
    does) for `devices` on a (data, fsdp) mesh and reads its buffer plan; nothing runs and no array is
    made."""
    platform = devices[0].platform
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=fsdp)), list(devices))
    concrete = dataclasses.replace(case, conv_impl=fast_conv.resolve(case.conv_impl, _backend(platform)))
    model, init_inputs, loss_fn, run = step_benchmark.model_and_loss(
        suite_cases.architecture(concrete), case.stage, mask_ratio=suite_cases.MASK_RATIO,
        num_classes=suite_cases.NUM_CLASSES)
    state = trainer.abstract_state(model, init_inputs, run, mesh, steps_total=1000)
    batch_sharding = sharding.batch_sharding(mesh)
    one_example = step_benchmark.pipeline_batch(1, case.img_size, suite_cases.NUM_CLASSES)
    batch = {key: jax.ShapeDtypeStruct((case.batch_size, *value.shape[1:]), value.dtype, sharding=batch_sharding)
             for key, value in one_example.items()}
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(jax.random.key, 0).dtype, sharding=sharding.replicated(mesh))
    step = sharding.make_train_step(step_impl, loss_fn, mesh, state)
    start = time.perf_counter()
    memory = step.lower(state, batch, rng).compile().memory_analysis()
    compile_s = time.perf_counter() - start
    state_bytes = sharding.bytes_per_device(state)
    return Plan(case.batch_size, state_bytes, device_suite.planned_peak_bytes(memory), compile_s)


def _backend(platform: str) -> str:
    """The name `jax.default_backend()` would give on a machine with these devices."""
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def batch_step(num_devices: int, multiple: int = 16) -> int:
    """Batches the search tries are multiples of this: of `multiple` and of the devices."""
    return math.lcm(multiple, num_devices)


def line_plans(case: suite_cases.Case, devices: Sequence[jax.Device], fsdp: int = 1,
               step_impl: str = "jit") -> list[Plan]:
    """The plans at the case's batch and twice it: the two points the batch line is drawn through."""
    return [plan(dataclasses.replace(case, batch_size=b), devices, fsdp, step_impl)
            for b in (case.batch_size, 2 * case.batch_size)]


def per_image_bytes(smaller: Plan, larger: Plan) -> float:
    """The slope of the plan's line through two batches."""
    return (larger.peak_bytes - smaller.peak_bytes) / (larger.batch_size - smaller.batch_size)


def largest_batch(case: suite_cases.Case, devices: Sequence[jax.Device], capacity: int, fsdp: int = 1,
                  max_batch: int = MAX_BATCH, step_impl: str = "jit") -> tuple[Plan | None, list[Plan]]:
    """The largest batch up to `max_batch` (a multiple of `batch_step`) that the plan's line predicts
    within `capacity` less `HEADROOM`, checked by compiling it. Memory is linear in the batch, so
    the line through the plans at the case's batch and twice it rarely misses; after a miss it is
    drawn again through the two plans whose peaks lie nearest the limit. Returns (that plan, else
    the largest planned batch that fits, or None if none does; every plan compiled)."""
    step = batch_step(len(devices))
    limit = capacity * (1 - HEADROOM)
    plans = line_plans(case, devices, fsdp, step_impl)
    tried: set[int] = set()
    while True:
        low, high = sorted(sorted(plans, key=lambda p: abs(p.peak_bytes - limit))[:2], key=lambda p: p.batch_size)
        slope = per_image_bytes(low, high)
        batch = int(low.batch_size + (limit - low.peak_bytes) / slope) if slope > 0 else max_batch
        batch = min(batch, max_batch) // step * step
        if batch < step or batch in tried:
            return max((p for p in plans if p.peak_bytes <= limit), key=lambda p: p.batch_size, default=None), plans
        tried.add(batch)
        checked = next((p for p in plans if p.batch_size == batch), None)
        if checked is None:
            checked = plan(dataclasses.replace(case, batch_size=batch), devices, fsdp, step_impl)
            plans.append(checked)
        if checked.peak_bytes <= limit:
            return checked, plans


HEADER = ("| case | devices | batch | state GB / device | planned peak GB / device | GB per image | "
          "largest batch within {limit} | its peak GB | compile s |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|")


def gigabytes(count: float, decimals: int = 2) -> str:
    """Bytes as GB: `decimals` places from 1 GB up, three significant digits below (a small preset's
    plan would otherwise read 0.00)."""
    value = count / 1e9
    return f"{value:.{decimals}f}" if value >= 1 or not value else f"{value:.3g}"


def plan_table(cases: Sequence[suite_cases.Case], target: str, num_devices: int = 1,
               fsdp: int = 1, step_impl: str = "jit") -> Iterator[str]:
    """Yields a markdown table: each case's plan at its batch and the largest batch that fits one
    `target` device (GPU targets; on 'cpu' only the plan at the case's batch and twice it)."""
    devices = target_devices(target, num_devices)
    capacity = device_capacity(target)
    limit = f"{capacity * (1 - HEADROOM) / 1e9:.0f} GB" if capacity else "n/a"
    room = (f"limit: {100 * (1 - HEADROOM):.0f} % of the {capacity / 1e9:.0f} GB a step may use per device"
            if capacity else "no limit (host memory)")
    flags = os.environ.get("XLA_FLAGS", "").strip()
    yield (f"{num_devices} x {devices[0].device_kind} ({target}, planned by XLA without running), mesh "
           f"data={num_devices // fsdp} x fsdp={fsdp}, step_impl={step_impl}, JAX {jax.__version__}, "
           f"XLA_FLAGS={flags!r}; {room}; {len(cases)} case(s), each compiled "
           f"{'several times' if capacity else 'twice'}")
    yield HEADER.format(limit=limit)
    for case in cases:
        try:
            if capacity:
                best, plans = largest_batch(case, devices, capacity, fsdp, step_impl=step_impl)
            else:
                best, plans = None, line_plans(case, devices, fsdp, step_impl)
        except Exception as error:  # one case XLA cannot compile must not cost the others
            yield f"| {case.name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:160]} |"
            continue
        first, second = plans[0], plans[1]
        per_image = per_image_bytes(first, second)
        capped = "+" if best and best.batch_size + batch_step(num_devices) > MAX_BATCH else ""  # more would fit
        found = (f"{best.batch_size}{capped} | {gigabytes(best.peak_bytes)}" if best
                 else "none fits | " if capacity else "no limit | -")
        yield (f"| {case.name} | {num_devices} | {case.batch_size} | {gigabytes(first.state_bytes)} | "
               f"{gigabytes(first.peak_bytes)} | {gigabytes(per_image, 3)} | {found} | "
               f"{sum(p.compile_s for p in plans) / len(plans):.0f} |")
