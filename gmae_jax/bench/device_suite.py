"""The one-call accelerator benchmark: `python -m gmae_jax.bench --suite=device`.

Built for a short loan of a GPU or TPU: the headline cases run first (`suite_cases.default_cases`), every row
is printed the moment it is measured (a cut-off run still leaves numbers), and cases that would end after the
time budget are listed as skipped. Per case: compile seconds, images/s of the full train step
(forward, backward, AdamW) on batches as the input pipeline yields them (uint8, with the colour
jitter the step applies on the device), peak device memory, model FLOPs per image (matmuls and convolutions of
the forward and backward pass, counted from the step's jaxpr by `model_flops`: XLA:GPU's cost
analysis counted about half of them on an H200) and MFU against the device's peak. A batch that
does not fit is halved and retried; each row estimates the largest batch that would fit from the
step's memory plan (`batch_that_fits`), and with `grow` the suite also measures the case there (one
more compile per case: `--suite_batch_sizes=max`). Right after the first case's row, the eager PyTorch
mirror's img/s on it (timed before JAX starts on the device) and the ratio, and where the step spends its
time (`step_profile`: a trace of 3 steps), so that a loan cut short still says what to change.
"""

from __future__ import annotations

import dataclasses
import os
import re
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from gmae_jax import user_errors
from gmae_jax.models import fast_conv
from gmae_jax.bench import step_benchmark, step_profile, suite_mirror
from gmae_jax.bench.suite_cases import (MASK_RATIO, NUM_CLASSES, TIMED_WINDOWS, WARMUP_STEPS, Case, architecture,
                                        flops_per_image, progress)
from gmae_jax.train import sharding

# Share of the allocator's memory a batch estimate leaves free: fragmentation, batches in flight, the
# plan's own error (`memory_plan` plans with the same margin).
HEADROOM = 0.15
MAX_BATCH = 4096  # where growing a batch stops: img/s no longer rises on any accelerator targeted
# Dense peak FLOP/s per chip by compute dtype (float32 matmuls run as TF32 on NVIDIA by default), by a
# pattern of the device kind: the first that matches counts, so PCIe and NVL cards come before the SXM
# part of the same name, and L40S before L40 before L4. JAX names a v5p chip "TPU v5" and a v5e "TPU v5
# lite" (likewise v6e "TPU v6 lite").
PEAK_FLOPS = (
    (r"H100 PCIe", {"bfloat16": 756e12, "float32": 378e12}),
    (r"H[12]00 NVL", {"bfloat16": 835e12, "float32": 418e12}),
    (r"H200|H100", {"bfloat16": 989e12, "float32": 494e12}),  # SXM, and GH200's H100 / H200
    (r"A100", {"bfloat16": 312e12, "float32": 156e12}),
    (r"L40S", {"bfloat16": 362e12, "float32": 183e12}),
    (r"L40\b", {"bfloat16": 181e12, "float32": 90e12}),
    (r"L4\b", {"bfloat16": 121e12, "float32": 60e12}),
    (r"TPU v6( lite|e)", {"bfloat16": 918e12, "float32": 918e12}),
    (r"TPU v5( lite|e)", {"bfloat16": 197e12, "float32": 197e12}),
    (r"TPU v5p?$", {"bfloat16": 459e12, "float32": 459e12}),
    (r"TPU v4$", {"bfloat16": 275e12, "float32": 275e12}),
)
# Seconds a case of each preset takes at the least (session 28's compiles of bf16 pretraining on an
# H200, 224 px, the suite's batches; initialising and timing come on top): a case not expected to end
# within the budget is not started, as the call's time limit would cut it off mid-compile. Once a
# preset's case has run, its own time counts instead.
CASE_SECONDS = {"small": 130.0, "base": 175.0, "reference": 225.0}


def peak_flops(device: jax.Device, dtype: str) -> float | None:
    """MFU's denominator: the chip's dense peak for `dtype` (None for a kind not in `PEAK_FLOPS`)."""
    for pattern, peaks in PEAK_FLOPS:
        if re.search(pattern, device.device_kind.strip(), re.IGNORECASE):
            return peaks[dtype]
    return None


def peaks_line(device: jax.Device) -> str:
    """The peaks MFU is computed against, for the table's first line (a reader checks the card)."""
    peaks = [f"{dtype} {peak / 1e12:.0f}" for dtype in ("bfloat16", "float32")
             if (peak := peak_flops(device, dtype))]
    return f"MFU against {' / '.join(peaks)} TFLOP/s per device" if peaks else "MFU n/a (peak of this device unknown)"


def measure(case: Case, mesh: jax.sharding.Mesh, num_steps: int, profile_steps: int = 0) -> dict[str, Any]:
    """Compile and time one case at its batch size; raises on out-of-memory. With `profile_steps`,
    also traces that many more steps: `result['profile']` is their `step_profile.StepProfile` (or a
    line saying why there is none: a profile that fails costs the row nothing)."""
    progress(f"{case.name}, batch {case.batch_size}: initialising")
    peak_before = _peak_bytes_in_use()
    bench = step_benchmark.build_train_step(architecture(case), case.stage, case.batch_size,
                                            mask_ratio=MASK_RATIO, num_classes=NUM_CLASSES, mesh=mesh,
                                            pipeline_inputs=True)
    state, batch, rng = bench.state, bench.batch, bench.rng
    start = time.perf_counter()
    lowered = bench.step.lower(state, batch, rng)
    lower_s = time.perf_counter() - start
    progress(f"{case.name}, batch {case.batch_size}: traced and lowered in {lower_s:.1f} s; compiling")
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    progress(f"{case.name}, batch {case.batch_size}: XLA compiled in {compile_s - lower_s:.1f} s; timing")
    memory = compiled.memory_analysis()
    for _ in range(WARMUP_STEPS):
        state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    windows = []
    for _ in range(TIMED_WINDOWS):
        start = time.perf_counter()
        for _ in range(num_steps):
            state, metrics = compiled(state, batch, rng)
        jax.block_until_ready(metrics)
        windows.append((time.perf_counter() - start) / num_steps)
    seconds = statistics.median(windows)
    profile = None
    if profile_steps:
        progress(f"{case.name}, batch {case.batch_size}: tracing {profile_steps} steps for the profile")
        try:
            profile, state = step_profile.profile_compiled(compiled, state, batch, rng, num_steps=profile_steps)
        except Exception as error:  # the case's row stands without it (and a failed trace is no OOM to halve for)
            profile = f"no profile: {type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    peak = _peak_bytes_in_use()
    planned = planned_peak_bytes(memory) if memory else 0
    capacity = _device_capacity()
    fits = (batch_that_fits(case.batch_size, planned, memory.argument_size_in_bytes, capacity, mesh.size)
            if memory and capacity else None)
    del state, bench
    return {
        "batch": case.batch_size,
        "compile_s": compile_s,
        "img_per_s": case.batch_size / seconds,
        "step_ms": seconds * 1e3,
        # The device's peak is the process's: a case below an earlier one's peak only knows it is lower.
        "peak_gb": (planned if peak is None else peak) / 1e9,
        "peak_is_earlier": peak is not None and peak_before is not None and peak <= peak_before,
        "planned_gb": planned / 1e9,
        "fits_batch": fits,
        "flops_per_img": flops_per_image(case),
        "loss": float(metrics["loss"]),
        "profile": profile,
    }


def _peak_bytes_in_use() -> int | None:
    """The most device memory in use since the process started (None where the device does not say)."""
    return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")


def _device_capacity() -> int | None:
    """Bytes the allocator may hand out on one device (None where the device does not say: CPUs)."""
    return (jax.devices()[0].memory_stats() or {}).get("bytes_limit")


def batch_that_fits(batch: int, planned_bytes: int, fixed_bytes: int, capacity: int, multiple: int) -> int:
    """The largest batch (a multiple of `multiple`) whose memory, on the line from `fixed_bytes` (the
    step's arguments: parameters, optimiser state) through `planned_bytes` at `batch`, stays within
    `capacity` less `HEADROOM`. Conservative: gradients and other fixed temporaries count as
    per-image here, so a real step fits at least this batch (give or take the plan's own error)."""
    per_image = max(planned_bytes - fixed_bytes, 1) / batch
    images = (capacity * (1 - HEADROOM) - fixed_bytes) / per_image
    return max(int(images) // multiple * multiple, 0)


def grown_batch(batch: int, fits: int | None) -> int | None:
    """The case's batch doubled while it stays within `fits` and `MAX_BATCH`; None if not even once."""
    grown = batch
    while fits and 2 * grown <= min(fits, MAX_BATCH):
        grown *= 2
    return grown if grown > batch else None


def planned_peak_bytes(memory: Any) -> int:
    """A compiled step's device memory as XLA planned it (`memory_analysis()`): arguments, outputs
    not aliased to them (the donated state is), temporaries."""
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
            + memory.temp_size_in_bytes)


def measure_fitting(case: Case, mesh: jax.sharding.Mesh, num_steps: int, profile_steps: int = 0,
                    smallest: int = 0) -> dict[str, Any]:
    """`measure` at the case's batch, halving it while the device runs out of memory, down to `smallest`
    (at least a row per device)."""
    while True:
        try:
            return measure(case, mesh, num_steps, profile_steps)
        except Exception as error:  # XLA reports OOM as a runtime error of its own type
            if not user_errors.is_out_of_memory(error) or case.batch_size // 2 < max(smallest, mesh.size):
                raise
            case = dataclasses.replace(case, batch_size=case.batch_size // 2)


# peak GB: the device's peak memory in use during the case ("<=" an earlier case's peak where it did
# not rise above it); planned GB: XLA's plan of the step alone, what `bench --suite=memory` predicts
# without the device (their ratio calibrates it).
# fits ~batch: the largest batch the plan's line says fits the device (`batch_that_fits`; n/a where the
# device states no limit, as CPUs do).
HEADER = ("| case | batch | compile s | img/s | step ms | peak GB | GFLOPs/img | MFU | planned GB | fits ~batch |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


def format_row(case: Case, result: dict[str, float], device: jax.Device, num_devices: int) -> str:
    peak = peak_flops(device, case.dtype)
    flops = result["flops_per_img"]
    mfu = f"{100 * flops * result['img_per_s'] / (peak * num_devices):.1f} %" if peak and flops else "n/a"
    return (f"| {case.name} | {result['batch']} | {result['compile_s']:.1f} | {result['img_per_s']:.1f} | "
            f"{result['step_ms']:.1f} | {'<= ' if result.get('peak_is_earlier') else ''}{result['peak_gb']:.2f} | "
            f"{flops / 1e9:.2f} | {mfu} | "
            f"{result['planned_gb']:.2f} | {result.get('fits_batch') or 'n/a'} |")


def failed_row(case: Case, error: Exception, where: str = "") -> str:
    """A case that failed, as a table row: the error's first line, so the loan's other rows stand."""
    first_line = (str(error).splitlines() or [""])[0][:120]
    return f"| {case.name} | failed{where}: {type(error).__name__}: {first_line} |"


def run_suite(cases: Sequence[Case], budget_s: float, num_steps: int = 10,
              profile_steps: int = 3, grow: bool = False, with_mirror: bool = True) -> Iterator[str]:
    """Yields the table line by line (header first): the first case's row followed by the eager
    PyTorch mirror's line on it (timed first, `suite_mirror.time_mirror`), and the first case that ran by its
    profile (`profile_steps` traced steps; 0: none). No case starts that is expected to end after `budget_s`
    (`CASE_SECONDS`, or what the preset's last case took), the first excepted. With `grow`, a case whose
    row says a batch at least twice its own fits is measured again at the largest such power-of-two
    multiple (`grown_batch`), in the next row.
    """
    started = time.perf_counter()
    # Before JAX takes the device.
    mirror = suite_mirror.time_mirror(cases[0], num_steps) if cases and with_mirror else None
    mesh = sharding.make_mesh()
    device = jax.devices()[0]
    flags = os.environ.get("XLA_FLAGS", "").strip()
    windows = "matmuls" if fast_conv.resolve("auto", jax.default_backend()) == "matmul" else "XLA's convolutions"
    yield (f"{mesh.size} x {device.device_kind} ({device.platform}), JAX {jax.__version__}, "
           f"XLA_FLAGS={flags!r}, conv_impl=auto: window convolutions as {windows}; {peaks_line(device)}")
    yield HEADER
    skipped = []
    profiled = False
    took: dict[str, float] = {}  # preset -> seconds its last case took here

    def ends_in_budget(preset: str, first: bool) -> bool:
        elapsed = time.perf_counter() - started
        return elapsed <= budget_s and (first or elapsed + took.get(preset, CASE_SECONDS.get(preset, 0.0)) <= budget_s)

    def timed(case: Case, **kwargs: Any) -> dict[str, Any]:
        start = time.perf_counter()
        try:
            return measure_fitting(case, mesh, num_steps, **kwargs)
        finally:
            took[case.preset] = time.perf_counter() - start

    for index, case in enumerate(cases):
        if not ends_in_budget(case.preset, first=index == 0):
            skipped.append(case.name)
            continue
        try:
            result = timed(case, profile_steps=0 if profiled else profile_steps)
        except Exception as error:  # one broken case must not cost the rest of the loan
            yield failed_row(case, error)
            if index == 0 and mirror:
                yield suite_mirror.mirror_line(mirror, None)
            continue
        yield format_row(case, result, device, mesh.size)
        if index == 0 and not with_mirror:
            yield "PyTorch mirror: not timed in this call (--nosuite_mirror)"
        if index == 0 and mirror:
            # Simulated CPU devices share the cores the mirror ran on: per device only on accelerators.
            yield suite_mirror.mirror_line(mirror, result, mesh.size if device.platform != "cpu" else 1)
        larger = grown_batch(result["batch"], result.get("fits_batch")) if grow else None
        if larger and ends_in_budget(case.preset, first=False):
            grown = dataclasses.replace(case, batch_size=larger)
            try:
                # Halving stops above the case's own batch: that row is already in the table.
                grown_result = timed(grown, smallest=2 * result["batch"])
                yield format_row(grown, grown_result, device, mesh.size)
            except Exception as error:  # the row at the case's own batch stands
                yield failed_row(case, error, f" at batch {larger}")
        elif larger:
            skipped.append(f"{case.name} at batch {larger}")
        if isinstance(result["profile"], str):
            profiled = True  # once: another case's trace would most likely fail the same way
            yield result["profile"]
        elif result["profile"] is not None:
            profiled = True
            yield f"\nwhere the time goes: {case.name}, batch {result['batch']}, {profile_steps} traced steps\n"
            yield step_profile.markdown(result["profile"], untraced_step_ms=result["step_ms"],
                                        model_flops=result["flops_per_img"] * result["batch"] / mesh.size,
                                        peak_flops=peak_flops(device, case.dtype))
            yield "\n" + HEADER
    if skipped:
        yield f"skipped (would end past the {budget_s:.0f} s budget): {', '.join(skipped)}"
    yield f"total {time.perf_counter() - started:.0f} s"


def main_suite(cases: Sequence[Case], budget_s: float, num_steps: int, grow: bool = False,
               with_mirror: bool = True) -> list[str]:
    lines = []
    for line in run_suite(cases, budget_s, num_steps, grow=grow, with_mirror=with_mirror):
        print(line, flush=True)
        lines.append(line)
    return lines
