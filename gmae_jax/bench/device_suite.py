"""The one-call accelerator benchmark: `python -m gmae_jax.bench --suite=device`.

Built for a short loan of a GPU or TPU: the headline cases run first (`default_cases`), every row
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
import functools
import importlib.util
import os
import re
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax

from gmae_jax import config_lib, user_errors
from gmae_jax.models import fast_conv
from gmae_jax.models.presets import MASK_MODES, PRESETS, REMAT_MODES, GMSTConfig, gmst_config
from gmae_jax.bench import model_flops, step_benchmark, step_profile
from gmae_jax.train import sharding

NUM_CLASSES = 18
MASK_RATIO = 0.75
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
# Steps run before timing: XLA:GPU runs a step's command buffer op by op the first time and records its
# CUDA graph the second, so timing from the third leaves both out (PyTorch gets as many).
WARMUP_STEPS = 2
# Windows of `num_steps` timed steps: the median counts (a GPU shared with nothing still varies a few per
# cent between windows; seconds against a case's minutes of compile).
TIMED_WINDOWS = 3


@dataclasses.dataclass(frozen=True)
class Case:
    preset: str
    stage: str  # 'pretrain' or 'finetune'
    dtype: str = "bfloat16"
    mask_mode: str = "encoder"
    remat: str = "none"
    batch_size: int = 128
    img_size: int = 224
    depth: int | None = None  # encoder blocks; None: the preset's (tests use fewer)
    conv_impl: str = "auto"  # fast_conv.CONV_IMPLS

    @property
    def name(self) -> str:
        mask = f" {self.mask_mode}" if self.stage == "pretrain" else ""
        remat = f" remat={self.remat}" if self.remat != "none" else ""
        depth = f" depth={self.depth}" if self.depth is not None else ""
        conv = f" conv={self.conv_impl}" if self.conv_impl != "auto" else ""
        return f"{self.preset} {self.stage} {self.dtype}{mask}{remat}{depth}{conv}"

    @classmethod
    def from_name(cls, name: str, **fields: Any) -> Case:
        """The case `name` names (`Case.name`'s words, e.g. 'reference pretrain bfloat16 encoder
        remat=fine'), with `fields` (batch_size, img_size) added."""
        words = name.split()
        if len(words) < 3 or words[1] not in ("pretrain", "finetune"):
            raise ValueError(f"{name!r} is not a case name such as 'small pretrain bfloat16 encoder remat=block'")
        named: dict[str, Any] = dict(preset=words[0], stage=words[1], dtype=words[2])
        rest = words[3:]
        if words[1] == "pretrain" and rest and "=" not in rest[0]:
            named["mask_mode"], rest = rest[0], rest[1:]
        keys = {"remat": "remat", "depth": "depth", "conv": "conv_impl"}
        for word in rest:
            key, _, value = word.partition("=")
            if key not in keys:
                raise ValueError(f"{name!r}: {word!r} is none of {sorted(keys)}=...")
            named[keys[key]] = int(value) if key == "depth" and value.isdigit() else value
        choices = {"preset": tuple(PRESETS), "dtype": ("float32", "bfloat16"), "mask_mode": MASK_MODES,
                   "remat": REMAT_MODES, "conv_impl": fast_conv.CONV_IMPLS}
        for field, allowed in choices.items():
            if field in named and named[field] not in allowed:
                raise ValueError(f"{name!r}: {field} {named[field]!r} is not one of {allowed}")
        if not isinstance(named.get("depth", 1), int):
            raise ValueError(f"{name!r}: depth must be a whole number")
        case = cls(**named, **fields)
        if case.name != " ".join(words):
            raise ValueError(f"{name!r} does not name a case the same way; did you mean {case.name!r}?")
        return case


def default_cases(presets: Sequence[str] = ("small", "base", "reference"), img_size: int = 224,
                  batch_sizes: Sequence[int] = ()) -> list[Case]:
    """The headline first, then the comparisons: the bf16 dense pretraining step of every preset
    (smallest first; compiles, not steps, eat a short loan, so `reference`'s MFU must not wait
    behind every variant of `small`), then per variant (sparse masking, fine-tuning, f32, remat per
    block) every preset again, at `batch_sizes_for(presets, batch_sizes)`. The bf16 cases run without
    remat: `reference`'s fit an 80 GB H100 at batch 64 (planned: 44 GB pretraining, 32 GB
    fine-tuning), and remat's recomputation would cost it ~a fifth of its step (BENCHMARKS.md, session
    18); `reference` in float32 (~2x the activations) keeps remat per block."""
    variants = [  # (the case's fields, config.model.remat for `reference`, for the other presets)
        (dict(stage="pretrain"), "none", "none"),
        (dict(stage="pretrain", mask_mode="sparse"), "none", "none"),
        (dict(stage="finetune"), "none", "none"),
        (dict(stage="pretrain", dtype="float32"), "block", "none"),
        (dict(stage="pretrain"), "block", "block"),
    ]
    sizes = batch_sizes_for(presets, batch_sizes)
    cases = [Case(preset=preset, batch_size=batch, img_size=img_size,
                  remat=remat_reference if preset == "reference" else remat_others, **fields)
             for fields, remat_reference, remat_others in variants for preset, batch in zip(presets, sizes)]
    # Last, where a loan leaves time: the first case with tap sums (the candidate for `auto` on GPUs,
    # not yet measured on one), then with XLA's own convolutions (cuDNN on GPUs, whose autotuning
    # took ~290 s of a 368 s compile on an H200), against the im2col matmuls `auto` picks there.
    return cases + [dataclasses.replace(cases[0], conv_impl=impl) for impl in ("taps", "xla")]


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


def architecture(case: Case) -> GMSTConfig:
    """The model a case trains (its preset with the case's size, dtype, masking, remat and conv_impl)."""
    depth = {} if case.depth is None else {"depth": case.depth}
    return gmst_config(config_lib.model_section(case.preset, img_size=case.img_size, dtype=case.dtype,
                                                mask_mode=case.mask_mode, remat=case.remat,
                                                conv_impl=case.conv_impl, **depth))


def flops_per_image(case: Case) -> float:
    """Model FLOPs per image of a case's step (`model_flops`): the same for any dtype, remat mode and
    conv_impl and linear in the batch, so traced once per architecture (seconds for `reference`)."""
    counted = dataclasses.replace(architecture(case), dtype="float32", remat="none", conv_impl="auto")
    return _flops_per_image(counted, case.stage)


@functools.lru_cache(maxsize=None)
def _flops_per_image(architecture: GMSTConfig, stage: str) -> float:
    return model_flops.flops_per_image(architecture, stage, mask_ratio=MASK_RATIO, num_classes=NUM_CLASSES)


def _progress(message: str) -> None:
    """A timestamped line on stderr: where a call cut off by its time limit stopped (a compile that
    never ends looks like silence in the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def measure(case: Case, mesh: jax.sharding.Mesh, num_steps: int, profile_steps: int = 0) -> dict[str, Any]:
    """Compile and time one case at its batch size; raises on out-of-memory. With `profile_steps`,
    also traces that many more steps: `result['profile']` is their `step_profile.StepProfile`."""
    _progress(f"{case.name}, batch {case.batch_size}: initialising")
    peak_before = _peak_bytes_in_use()
    bench = step_benchmark.build_train_step(architecture(case), case.stage, case.batch_size,
                                            mask_ratio=MASK_RATIO, num_classes=NUM_CLASSES, mesh=mesh,
                                            pipeline_inputs=True)
    state, batch, rng = bench.state, bench.batch, bench.rng
    start = time.perf_counter()
    lowered = bench.step.lower(state, batch, rng)
    lower_s = time.perf_counter() - start
    _progress(f"{case.name}, batch {case.batch_size}: traced and lowered in {lower_s:.1f} s; compiling")
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    _progress(f"{case.name}, batch {case.batch_size}: XLA compiled in {compile_s - lower_s:.1f} s; timing")
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
        _progress(f"{case.name}, batch {case.batch_size}: tracing {profile_steps} steps for the profile")
        profile, state = step_profile.profile_compiled(compiled, state, batch, rng, num_steps=profile_steps)
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


@dataclasses.dataclass(frozen=True)
class MirrorRun:
    """The eager PyTorch mirror timed on a case: its img/s at `batch`, or None with the reason in `text`."""

    case: Case
    batch: int
    img_per_s: float | None
    text: str


def time_mirror(case: Case, num_steps: int) -> MirrorRun:
    """The eager PyTorch mirror (`torch_mirror.train_step`: the original's layout, AdamW, bf16 autocast
    on a GPU for a bf16 case) on the case's model and batch of float images (the original jitters and
    standardises in its workers; the JAX step does both on the device, so the ratio is if anything
    unfair to JAX). The suite times it before JAX starts on the device: JAX then holds 75 % of a GPU's
    memory for good, and the mirror beside it had to halve its batch (a `reference` case always). A
    batch that does not fit the device alone is halved too, and then gets no ratio."""
    if importlib.util.find_spec("torch") is None:
        return MirrorRun(case, case.batch_size, None, "PyTorch mirror: torch is not installed (pip install -e "
                                                       "'.[torch]')")
    import torch  # noqa: PLC0415 (optional extra)

    from gmae_jax.torch_mirror import train_step  # noqa: PLC0415

    bfloat16, batch_size = case.dtype == "bfloat16", case.batch_size
    while True:
        _progress(f"PyTorch mirror of {case.name}, batch {batch_size}: timing")
        step = None
        try:
            # The step alone holds the model (its closure): dropping it frees model and optimiser state.
            step = train_step.make_step(architecture(case), case.stage, batch_size, num_classes=NUM_CLASSES,
                                        mask_ratio=MASK_RATIO, bfloat16=bfloat16)[1]
            # Its step returns the loss as a float, so each step waits for the device.
            runner = step_benchmark.Runner("PyTorch mirror", step, lambda: {})
            rate = step_benchmark.images_per_second([runner], batch_size, num_steps, rounds=TIMED_WINDOWS,
                                                    warmup_steps=WARMUP_STEPS)[runner.name]
            break
        except torch.OutOfMemoryError:
            if batch_size <= 1:
                return MirrorRun(case, batch_size, None, "PyTorch mirror: out of memory at batch 1")
            batch_size //= 2
        finally:
            step = None  # frees the model and its optimiser state before a retry, and for JAX
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    on = f"{torch.cuda.get_device_name()}" if torch.cuda.is_available() else "CPU"
    autocast = ", bf16 autocast" if torch.cuda.is_available() and bfloat16 else ""
    return MirrorRun(case, batch_size, rate, f"PyTorch mirror of {case.name} (eager{autocast}, torch "
                                             f"{torch.__version__}, one {on}), batch {batch_size}: {rate:.1f} img/s")


def mirror_line(mirror: MirrorRun, jax_result: dict[str, Any] | None, num_devices: int = 1) -> str:
    """The mirror's line with JAX's img/s over it (the issue's ratio) where the two are like for like:
    the same batch (else no ratio), per device (the mirror runs on one), and dense masking named."""
    if mirror.img_per_s is None:
        return mirror.text
    if jax_result is None:
        return f"{mirror.text}; no ratio: the JAX case failed"
    if jax_result["batch"] != mirror.batch:
        return f"{mirror.text}; no ratio: JAX ran at batch {jax_result['batch']}"
    ratio = (f"JAX / PyTorch **{jax_result['img_per_s'] / num_devices / mirror.img_per_s:.2f}x**"
             + (f" (JAX per device, of {num_devices})" if num_devices > 1 else ""))
    if mirror.case.mask_mode != "encoder":  # the mirror's encoder computes every token, as the original's does
        ratio += f", not like for like: the mirror computes {mirror.case.mask_mode} masking densely"
    return f"{mirror.text}; {ratio}"


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
    PyTorch mirror's line on it (timed first, `time_mirror`), and the first case that ran by its
    profile (`profile_steps` traced steps; 0: none). No case starts that is expected to end after `budget_s`
    (`CASE_SECONDS`, or what the preset's last case took), the first excepted. With `grow`, a case whose
    row says a batch at least twice its own fits is measured again at the largest such power-of-two
    multiple (`grown_batch`), in the next row.
    """
    started = time.perf_counter()
    mirror = time_mirror(cases[0], num_steps) if cases and with_mirror else None  # before JAX takes the device
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
                yield mirror_line(mirror, None)
            continue
        yield format_row(case, result, device, mesh.size)
        if index == 0 and mirror:
            # Simulated CPU devices share the cores the mirror ran on: per device only on accelerators.
            yield mirror_line(mirror, result, mesh.size if device.platform != "cpu" else 1)
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
        if result["profile"] is not None:
            profiled = True
            yield f"\nwhere the time goes: {case.name}, batch {result['batch']}, {profile_steps} traced steps\n"
            yield step_profile.markdown(result["profile"])
            yield "\n" + HEADER
    if skipped:
        yield f"skipped (would end past the {budget_s:.0f} s budget): {', '.join(skipped)}"
    yield f"total {time.perf_counter() - started:.0f} s"


def main_suite(cases: Sequence[Case], budget_s: float, num_steps: int, grow: bool = False) -> list[str]:
    lines = []
    for line in run_suite(cases, budget_s, num_steps, grow=grow):
        print(line, flush=True)
        lines.append(line)
    return lines


# Each preset's batch, one that fits an 80 GB H100 in every variant of the suite (BENCHMARKS.md,
# session 18: planned without a GPU by `bench --suite=memory`).
DEFAULT_BATCH_SIZES = {"small": 256, "base": 128, "reference": 64}


def batch_sizes_for(presets: Sequence[str], requested: Sequence[int]) -> list[int]:
    """One batch size per preset: `requested` in the presets' order (a single value applies to all),
    or by default each preset's `DEFAULT_BATCH_SIZES` (128 for the others)."""
    sizes = list(requested) or [DEFAULT_BATCH_SIZES.get(preset, 128) for preset in presets]
    if len(sizes) == 1:
        return sizes * len(presets)
    if len(sizes) != len(presets):
        raise ValueError(f"{len(sizes)} batch sizes for {len(presets)} presets ({', '.join(presets)}): give one "
                         "per preset, or one for all")
    return sizes
