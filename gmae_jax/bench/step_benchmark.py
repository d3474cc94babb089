"""Training-step throughput, measured side by side in one process so that ratios compare like with
like on whatever machine runs them: float32 against bfloat16 JAX steps, or the JAX jit step against
the eager PyTorch mirror (`gmae_jax.torch_mirror.train_step`) of the same model, batch and optimiser.

Runners are timed in alternating rounds (order flipped every round) and the median round counts, so
load from other jobs on a shared machine hits every side alike.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from gmae_jax import config_lib, schema
from gmae_jax.data import transforms
from gmae_jax.models.presets import GMSTConfig, gmst_config
from gmae_jax.bench import step_profile
from gmae_jax.train import setup, sharding, steps, tasks, trainer

TASKS = ("pretrain", "finetune")
NUM_CLASSES = 10
MASK_RATIO = 0.6


@dataclasses.dataclass
class Runner:
    """One side of a comparison: `step()` runs one optimiser step and waits for it; `params()` is a
    flat {name: numpy array} snapshot of the trainable weights (to check that steps change them)."""

    name: str
    step: Callable[[], None]
    params: Callable[[], dict[str, np.ndarray]]


def preset_architecture(preset: str, dtype: str, overrides: Mapping[str, Any] | None = None) -> GMSTConfig:
    """The architecture of `preset` with `overrides` (e.g. img_size, patch_size) applied."""
    return gmst_config(config_lib.model_section(preset, dtype=dtype, **(overrides or {})))


@dataclasses.dataclass
class BenchStep:
    """A model's jitted train step with its state and a fixed batch, ready to time.

    `advance()` runs one step and keeps the new state (the step donates the old one)."""

    model: nn.Module
    state: steps.TrainState
    step: Callable  # jitted step(state, batch, rng) -> (state, metrics)
    batch: dict[str, jax.Array]
    rng: jax.Array

    def advance(self) -> dict[str, jax.Array]:
        self.state, metrics = self.step(self.state, self.batch, self.rng)
        return metrics


def model_and_loss(
    config: GMSTConfig, task: str, *, mask_ratio: float = MASK_RATIO, num_classes: int = NUM_CLASSES,
    seed: int = 0,
) -> tuple[nn.Module, tuple[jax.Array, ...], Callable, ml_collections.ConfigDict]:
    """`task`'s model, its example inputs for `init`, the loss the step differentiates, and the run
    config they come from (AdamW at a constant learning rate, no warm-up, clipping at 1)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    optim = schema.OptimConfig(min_lr=schema.OptimConfig.lr, warmup_steps=0)
    stage = (schema.PretrainConfig(mask_ratio=mask_ratio) if task == "pretrain"
             else schema.FinetuneConfig(num_classes=num_classes))
    run = ml_collections.ConfigDict(dict(stage=task, optim=dataclasses.asdict(optim), model=dataclasses.asdict(config),
                                         seed=seed, **dataclasses.asdict(stage)))
    model, init_inputs = setup.build_model(run)
    class_names = [f"class_{index}" for index in range(num_classes)]
    return model, init_inputs, tasks.make_task(run, model, class_names).loss_fn, run


def pipeline_batch(batch_size: int, img_size: int, num_classes: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A random batch as the input pipeline yields it: uint8 pixels, labels and each view's colour
    jitter drawn at the default strengths, which the train step applies and standardises on the
    device (`steps.train_images`) as in a training run."""
    rng = np.random.default_rng(seed)
    aug = schema.AugmentConfig()
    jitter = [transforms.sample_color_jitter(rng, aug.brightness, aug.contrast, aug.saturation, aug.hue)
              for _ in range(batch_size)]
    return {"image": rng.integers(0, 256, (batch_size, img_size, img_size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, (batch_size,), dtype=np.int32),
            "color_jitter": np.stack(jitter)}


def build_train_step(
    config: GMSTConfig, task: str, batch_size: int, *, mask_ratio: float = MASK_RATIO,
    num_classes: int = NUM_CLASSES, mesh: jax.sharding.Mesh | None = None, seed: int = 0,
    pipeline_inputs: bool = False,
) -> BenchStep:
    """The project's jitted data-parallel train step (AdamW, clipping) of `task`'s model on a random
    batch already on the devices (host transfers are not part of what is timed): standardised float
    images, or with `pipeline_inputs` a `pipeline_batch` (uint8 plus colour jitter, what a training
    run's step is given; the PyTorch comparisons use float images, as the original's step does).

    What every benchmark of the step starts from. Constant learning rate (no warm-up) so that the
    very first step already moves the weights.
    """
    mesh = mesh or sharding.make_mesh()
    model, init_inputs, loss_fn, run = model_and_loss(config, task, mask_ratio=mask_ratio,
                                                      num_classes=num_classes, seed=seed)
    state, _ = trainer.create_state(model, init_inputs, run, mesh, 1000)
    train_step = sharding.jit_train_step(functools.partial(steps.train_step, loss_fn=loss_fn), mesh, state)
    if pipeline_inputs:
        batch = jax.device_put(pipeline_batch(batch_size, config.img_size, num_classes, seed),
                               sharding.batch_sharding(mesh))
    else:
        shape = (batch_size, config.img_size, config.img_size, config.in_channels)
        image_key, label_key = jax.random.split(jax.random.key(seed))
        make_batch = jax.jit(lambda: {"image": jax.random.normal(image_key, shape),
                                      "label": jax.random.randint(label_key, (batch_size,), 0, num_classes)},
                             out_shardings=sharding.batch_sharding(mesh))
        batch = make_batch()
    return BenchStep(model, state, train_step, batch, jax.random.key(seed))


def jax_runner(config: GMSTConfig, task: str, batch_size: int, seed: int = 0) -> Runner:
    """`build_train_step` as one side of a comparison."""
    bench = build_train_step(config, task, batch_size, seed=seed)

    def step() -> None:
        jax.block_until_ready(bench.advance())

    def params() -> dict[str, np.ndarray]:
        flat = jax.tree_util.tree_leaves_with_path(bench.state.params)
        return {jax.tree_util.keystr(path): np.array(leaf) for path, leaf in flat}

    return Runner(f"JAX jit ({config.dtype})", step, params)


def torch_runner(config: GMSTConfig, task: str, batch_size: int, seed: int = 0) -> Runner:
    """The eager PyTorch mirror's step (imports torch, an optional extra)."""
    from gmae_jax.torch_mirror import train_step  # noqa: PLC0415 (torch only when asked for)

    model, step = train_step.make_step(config, task, batch_size, num_classes=NUM_CLASSES,
                                       mask_ratio=MASK_RATIO, seed=seed, bfloat16=config.dtype == "bfloat16")
    autocast = " + bf16 autocast" if next(model.parameters()).is_cuda and config.dtype == "bfloat16" else ""

    def params() -> dict[str, np.ndarray]:
        return {name: p.detach().float().cpu().numpy().copy() for name, p in model.named_parameters()}

    return Runner(f"PyTorch eager (float32{autocast})", lambda: step(), params)


def images_per_second(
    runners: Sequence[Runner], batch_size: int, num_steps: int, rounds: int, warmup_steps: int = 2,
) -> dict[str, float]:
    """Median over `rounds` of each runner's images/s over `num_steps` steps; rounds alternate the
    runners' order (ABBA...) after `warmup_steps` untimed steps each (compilation, allocator)."""
    for runner in runners:
        for _ in range(warmup_steps):
            runner.step()
    rates: dict[str, list[float]] = {r.name: [] for r in runners}
    for i in range(rounds):
        for runner in runners if i % 2 == 0 else runners[::-1]:
            start = time.perf_counter()
            for _ in range(num_steps):
                runner.step()
            rates[runner.name].append(batch_size * num_steps / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def _device_line() -> str:
    device = jax.devices()[0]
    return f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()})"


def _describe(preset: str, config: GMSTConfig, batch_size: int) -> str:
    return (f"{preset} ({config.img_size} px, patch {config.patch_size}, embed {config.embed_dim}), "
            f"batch {batch_size}")


def run_step_benchmark(preset: str, batch_size: int, num_steps: int, rounds: int = 3,
                       overrides: Mapping[str, Any] | None = None) -> dict[str, float]:
    """float32 vs bfloat16 JAX pretraining steps in alternating rounds of one process; prints the ratio."""
    configs = {dtype: preset_architecture(preset, dtype, overrides) for dtype in ("float32", "bfloat16")}
    runners = {dtype: jax_runner(config, "pretrain", batch_size) for dtype, config in configs.items()}
    rates = images_per_second(list(runners.values()), batch_size, num_steps, rounds)
    results = {dtype: rates[runner.name] for dtype, runner in runners.items()}
    print(f"pretraining step, {_describe(preset, configs['float32'], batch_size)}; "
          f"{_device_line()}; median of {rounds} alternating rounds of {num_steps} steps")
    for dtype, rate in results.items():
        print(f"  {dtype:9s} {rate:10.1f} img/s   x{rate / results['float32']:.2f} vs float32")
    return results


def compare(ours: Runner, theirs: Runner, task: str, batch_size: int, num_steps: int,
            rounds: int) -> dict[str, Any]:
    """One table row: both runners timed in alternating rounds."""
    rates = images_per_second([ours, theirs], batch_size, num_steps, rounds)
    return dict(task=task, jax=rates[ours.name], torch=rates[theirs.name],
                ratio=rates[ours.name] / rates[theirs.name], jax_name=ours.name, torch_name=theirs.name)


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Rows of `compare` as a markdown table (img/s and the JAX / PyTorch ratio)."""
    lines = [f"| step | {rows[0]['jax_name']} img/s | {rows[0]['torch_name']} img/s | JAX / PyTorch |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['jax']:.1f} | {r['torch']:.1f} | **{r['ratio']:.2f}x** |" for r in rows]
    return "\n".join(lines)


def busy_machine_warning(load_before: float, load_after: float, cores: int, on_cpu: bool) -> str | None:
    """A warning when other work shared the CPU during a CPU side-by-side: PyTorch's OpenMP regions
    wait at a barrier for every thread, so its step collapses on busy cores while XLA's degrades far
    less (BENCHMARKS.md, "Load": 212 -> 8-19 img/s at load 8-9), and the ratio then favours JAX."""
    busiest = max(load_before, load_after)
    if not on_cpu or busiest <= cores / 2:
        return None
    return (f"warning: load average {busiest:.1f} on {cores} cores: other work shared the CPU, which slows "
            "PyTorch's step far more than JAX's; rerun on an idle machine before quoting this ratio")


def run_vs_torch(
    preset: str, batch_size: int, num_steps: int, rounds: int, tasks: Sequence[str] = TASKS,
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """JAX jit step vs the eager PyTorch mirror, per task; prints a markdown table, returns its rows.

    float32 on CPU; on a GPU the JAX side computes in bfloat16 and PyTorch under bf16 autocast.
    """
    import torch  # noqa: PLC0415 (optional extra)

    dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    config = preset_architecture(preset, dtype, overrides)
    load = os.getloadavg()[0]
    rows = [compare(jax_runner(config, task, batch_size), torch_runner(config, task, batch_size), task,
                    batch_size, num_steps, rounds) for task in tasks]
    print(f"\n{_describe(preset, config, batch_size)}; JAX {jax.__version__} on {_device_line()}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads; median of {rounds} "
          f"alternating rounds of {num_steps} steps; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print(markdown_table(rows))
    warning = busy_machine_warning(load, os.getloadavg()[0], os.cpu_count() or 1, jax.default_backend() == "cpu")
    if warning:
        print(f"\n{warning}")
    return rows


def print_profile(preset: str, dtype: str, tasks: Sequence[str], batch_size: int, num_steps: int,
                  overrides: Mapping[str, Any] | None = None, vs_torch: bool = False,
                  ) -> dict[str, step_profile.StepProfile]:
    """Where each task's compiled step spends its time (`step_profile`), printed as markdown; with
    `vs_torch`, also the eager PyTorch mirror's step by the same kinds of work, side by side."""
    from gmae_jax.bench import model_flops  # noqa: PLC0415 (it imports this module)

    config = preset_architecture(preset, dtype, overrides)
    results = {}
    for task in tasks:
        bench = build_train_step(config, task, batch_size)
        results[task] = step_profile.profile_train_step(bench.step, bench.state, bench.batch, bench.rng,
                                                        num_steps=num_steps)
        flops = model_flops.train_step_flops(config, task, batch_size, mask_ratio=MASK_RATIO,
                                             num_classes=NUM_CLASSES) / jax.device_count()
        print(f"\n{task} step, {preset} ({config.img_size} px, patch {config.patch_size}, embed "
              f"{config.embed_dim}), {dtype}, batch {batch_size}; JAX {jax.__version__} on {_device_line()}; "
              f"{num_steps} traced steps; load average {os.getloadavg()[0]:.1f}\n")
        print(step_profile.markdown(results[task], model_flops=flops))
        if vs_torch:
            print(f"\n{kinds_vs_torch_table(results[task], torch_kind_ms(config, task, batch_size, num_steps))}")
    return results


def torch_kind_ms(config: GMSTConfig, task: str, batch_size: int, num_steps: int) -> dict[str, float]:
    """The PyTorch mirror's step (same model, batch, optimiser) in ms per step by kind of work."""
    from gmae_jax.bench import torch_step_profile as torch_profile  # noqa: PLC0415 (torch only when asked for)

    runner = torch_runner(config, task, batch_size)
    for _ in range(2):
        runner.step()
    return torch_profile.kind_ms(runner.step, num_steps)


def kinds_vs_torch_table(ours: step_profile.StepProfile, theirs: Mapping[str, float]) -> str:
    """ms per step by kind of work, JAX beside PyTorch, with their ratio."""
    jax_ms = dict(ours.by("kind"))
    rows = [(kind, jax_ms.get(kind, 0.0), theirs.get(kind, 0.0)) for kind in step_profile.KINDS]
    rows = [row for row in rows if row[1] or row[2]]
    rows.append(("all", sum(jax_ms.values()), sum(theirs.values())))
    lines = ["| kind of work | JAX ms per step | PyTorch ms per step | JAX time / PyTorch time |", "|---|---:|---:|---:|"]
    lines += [f"| {kind} | {a:.1f} | {b:.1f} | {f'{a / b:.2f}x' if b else 'n/a'} |" for kind, a, b in rows]
    return "\n".join(lines)
