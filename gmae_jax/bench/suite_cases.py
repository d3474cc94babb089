"""The device suite's cases and how each is timed (`device_suite` measures them with JAX,
`suite_mirror` with the eager PyTorch mirror): which model, step, dtype, masking, remat, batch and
image size a case is, its name on the command line (`--suite_cases`), the headline order a short loan
runs them in, and the model FLOPs MFU is computed from."""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from collections.abc import Sequence
from typing import Any

from gmae_jax import config_lib
from gmae_jax.models import fast_conv
from gmae_jax.models.presets import MASK_MODES, PRESETS, REMAT_MODES, GMSTConfig, gmst_config
from gmae_jax.bench import model_flops

NUM_CLASSES = 18
MASK_RATIO = 0.75
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


def progress(message: str) -> None:
    """A timestamped line on stderr: where a call cut off by its time limit stopped (a compile that
    never ends looks like silence in the table)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
