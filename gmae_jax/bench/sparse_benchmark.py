"""Pretraining step of the sparse encoder (`mask_mode='sparse'`) against the dense one ('encoder'):
images/s timed in one process, interleaved round by round, and XLA's FLOP count of each compiled step.

    python -m gmae_jax.bench --sparse_vs_dense --preset=mini --batch_size=64 --mask_ratio=0.6
    python -m gmae_jax.bench --sparse_vs_dense --preset=tiny --model_override=img_size=64 \
        --model_override=patch_size=8 --batch_size=32 --mask_ratio=0.75
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from gmae_jax import config_checks, config_lib
from gmae_jax.models.gmae import GMAE
from gmae_jax.models.masking import num_visible, sample_mask
from gmae_jax.models.presets import gmst_config
from gmae_jax.bench import step_benchmark

MODES = ("encoder", "sparse")


def _flops(compiled: Any) -> float:
    return float(compiled.cost_analysis().get("flops", float("nan")))


def encoder_flops(model: GMAE, variables: Any, images: Any, mask_ratio: float) -> float:
    """XLA's FLOP count of the compiled encoder forward pass (`GMAE.encode`, inference mode)."""
    num_patches = model.config.num_patches
    mask = sample_mask(jax.random.key(0), images.shape[0], num_patches, mask_ratio)
    encode = jax.jit(functools.partial(
        model.apply, method=GMAE.encode, train=False, num_visible=num_visible(num_patches, mask_ratio)))
    return _flops(encode.lower(variables, images, mask).compile())


def build_step(
    preset: str, mask_mode: str, batch_size: int, mask_ratio: float, **model_overrides: Any
) -> tuple[Callable[[], Any], float, float]:
    """(run one step, FLOPs of the compiled train step, FLOPs of the encoder's forward pass)."""
    fields = config_lib.model_section(preset, mask_mode=mask_mode, **model_overrides)
    config_checks.validate_model(fields)
    bench = step_benchmark.build_train_step(gmst_config(fields), "pretrain", batch_size, mask_ratio=mask_ratio)
    step_flops = _flops(bench.step.lower(bench.state, bench.batch, bench.rng).compile())
    variables = {"params": bench.state.params, "batch_stats": bench.state.batch_stats}
    forward_flops = encoder_flops(bench.model, variables, bench.batch["image"], mask_ratio)
    jax.block_until_ready(bench.advance())  # compile
    return bench.advance, step_flops, forward_flops


def compare_mask_modes(
    preset: str, batch_size: int, mask_ratio: float, num_steps: int, rounds: int,
    modes: Sequence[str] = MODES, **model_overrides: Any,
) -> dict[str, dict[str, float]]:
    """Per mode: median images/s over `rounds` interleaved rounds of `num_steps` steps, and FLOPs.
    Every other round runs the modes in reverse order (ABBA), so neither always runs first after the
    other's work (caches, clocks); balanced for an even number of rounds."""
    built = {mode: build_step(preset, mode, batch_size, mask_ratio, **model_overrides) for mode in modes}
    rates: dict[str, list[float]] = {mode: [] for mode in modes}
    for round_index in range(rounds):
        for mode in (modes if round_index % 2 == 0 else modes[::-1]):
            run_step = built[mode][0]
            start = time.perf_counter()
            for _ in range(num_steps):
                metrics = run_step()
            jax.block_until_ready(metrics)
            rates[mode].append(batch_size * num_steps / (time.perf_counter() - start))
    return {mode: {"img_per_sec": statistics.median(rates[mode]), "step_flops": built[mode][1],
                   "encoder_flops": built[mode][2]} for mode in modes}


def print_comparison(preset: str, batch_size: int, mask_ratio: float, num_steps: int, rounds: int,
                     **model_overrides: Any) -> dict[str, dict[str, float]]:
    """`compare_mask_modes`, printed with ratios against the dense 'encoder' mode."""
    results = compare_mask_modes(preset, batch_size, mask_ratio, num_steps, rounds, **model_overrides)
    device = jax.devices()[0]
    overrides = f" {model_overrides}" if model_overrides else ""
    print(f"pretraining step, preset {preset}{overrides}, batch {batch_size}, "
          f"mask {mask_ratio}, {jax.device_count()} x {device.device_kind}; GFLOP from XLA's cost analysis of "
          "the compiled programs (every op, elementwise too: not --model_flops' matmul and convolution count)")
    base = results["encoder"]
    for mode, r in results.items():
        print(f"  {mode:8s} {r['img_per_sec']:8.1f} img/s (x{r['img_per_sec'] / base['img_per_sec']:.2f})"
              f"   step {r['step_flops'] / 1e9:8.2f} GFLOP (x{r['step_flops'] / base['step_flops']:.2f})"
              f"   encoder fwd {r['encoder_flops'] / 1e9:7.2f} GFLOP "
              f"(x{r['encoder_flops'] / base['encoder_flops']:.2f})")
    return results
