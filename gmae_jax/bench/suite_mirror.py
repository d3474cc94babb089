"""The eager PyTorch mirror timed on a device-suite case, and its line under the JAX row: the
issue's side by side (JAX / PyTorch img/s), printed only where the two are like for like."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from gmae_jax.bench import step_benchmark
from gmae_jax.bench.suite_cases import (MASK_RATIO, NUM_CLASSES, TIMED_WINDOWS, WARMUP_STEPS, Case, architecture,
                                        progress)


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
        progress(f"PyTorch mirror of {case.name}, batch {batch_size}: timing")
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
