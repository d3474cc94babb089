"""The benchmarks' command line (`python -m gmae_jax.bench`): the input pipeline (`--pipeline`) and the
training step (`--train_step`).

`--suite=device` is the one-call accelerator benchmark (`bench.device_suite`, or `launch/bench_device.sh`):
pretraining and fine-tuning img/s, compile seconds, peak memory and MFU of `small`, `base` and `reference`
at 224 px as a markdown table, then the eager PyTorch mirror on its first case if torch is installed.

`--sparse_vs_dense` times the pretraining step of `mask_mode='sparse'` against `'encoder'` in one process
(`bench.sparse_benchmark`), e.g. `python -m gmae_jax.bench --sparse_vs_dense --preset=mini --mask_ratio=0.75`.

`--profile_step` prints where the compiled step spends its time (`bench.step_profile`): shares by kind
of work, by phase and by layer, e.g. `python -m gmae_jax.bench --profile_step --preset=mini --batch_size=64`;
with `--vs_torch` also the PyTorch mirror's step by the same kinds of work, side by side.

`--checkpoint_save` times saving `--preset`'s train state on all local devices, whole arrays against
orbax's replica-parallel slices (`bench.checkpoint_benchmark`), e.g. on 8 simulated CPU devices:
`XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m gmae_jax.bench --checkpoint_save --preset=small`.

`--suite=memory` compiles the device suite's cases for a GPU or TPU this machine need not have and prints
XLA's memory plan per device and the largest batch that fits (`bench.memory_plan`), e.g.
`python -m gmae_jax.bench --suite=memory --plan_target=h100 --plan_devices=8 --plan_fsdp=8
--suite_presets=reference` (needs `pip install -e '.[gpu-plan]'`, for TPUs `.[tpu]`; `--plan_target=cpu`
plans for this machine's devices).

`--model_flops` prints the training GFLOP per image of every preset (what MFU and cost estimates
start from), counted from the step's jaxpr, e.g. `python -m gmae_jax.bench --model_flops --mask_ratio=0.75`.

`--train_step` alone compares float32 and bfloat16 JAX pretraining steps (alternating rounds, one
process; `--model_override` as below); with `--vs_torch` it times
the JAX jit step against the eager PyTorch mirror of the same model (see `bench.step_benchmark`), e.g.
`python -m gmae_jax.bench --train_step --vs_torch --preset=tiny --batch_size=32 \
--model_override=img_size=64 --model_override=patch_size=8`.

Input pipeline on full-HD JPEGs, `python -m gmae_jax.bench --pipeline`: images/s of one worker for
the original's views and ours, then batches from `--num_workers` grain workers to the trainer
(`bench.pipeline_benchmark`).
"""

import ast
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

from absl import app, flags, logging

from gmae_jax import config_checks, config_lib, host_memory, quiet_logs
from gmae_jax.bench import pipeline_benchmark
from gmae_jax.models.presets import GMSTConfig
from gmae_jax.schema import ConfigError

_PIPELINE = flags.DEFINE_bool("pipeline", False, "Benchmark the input pipeline.")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 32, "--pipeline: full-HD JPEGs to generate.", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "--pipeline: side of the square views cropped for the model.",
                                  lower_bound=1)
_CROP_SCALE_MIN = flags.DEFINE_float("crop_scale_min", 0.35,
                                     "--pipeline: smallest random-crop area (fine-tune default).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "--pipeline: passes over the images; the best one counts.",
                               lower_bound=1)
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "--pipeline: grain worker processes for the batch transport.",
                                    lower_bound=0)
_TRAIN_STEP = flags.DEFINE_bool("train_step", False, "Benchmark the pretraining step (float32 vs bfloat16).")
_PRESET = flags.DEFINE_string("preset", "small", "--train_step, --profile_step, --sparse_vs_dense, --checkpoint_save: "
                              "model preset.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "--train_step, --profile_step, --sparse_vs_dense: global batch "
                                   "size; --pipeline: transport batch.", lower_bound=1)
_NUM_STEPS = flags.DEFINE_integer("num_steps", 20, "--train_step, --profile_step, --sparse_vs_dense: timed steps "
                                 "(per round where there are rounds).", lower_bound=1)
_PROFILE_STEP = flags.DEFINE_bool("profile_step", False,
                                  "Where the train step's time goes: a jax.profiler trace joined with its HLO.")
_PROFILE_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "--profile_step: compute dtype.")
_VS_TORCH = flags.DEFINE_bool("vs_torch", False,
                               "--train_step, --profile_step: JAX jit step vs the eager PyTorch mirror.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "--train_step, --sparse_vs_dense: alternating timing rounds; "
                              "the median counts.", lower_bound=1)
_TASKS = flags.DEFINE_list("tasks", ["pretrain", "finetune"], "--vs_torch, --profile_step: steps to time.")
_SPARSE_VS_DENSE = flags.DEFINE_bool("sparse_vs_dense", False,
                                     "Pretraining step of mask_mode='sparse' vs 'encoder', one process.")
_MASK_RATIO = flags.DEFINE_float("mask_ratio", 0.6, "--sparse_vs_dense, --model_flops: fraction of patches hidden.")
flags.register_validator("mask_ratio", lambda ratio: 0.0 < ratio < 1.0, "--mask_ratio must be in (0, 1)")
_SUITE = flags.DEFINE_enum("suite", None, ["device", "memory"],
                           "device: the one-call accelerator suite (gmae_jax/bench/device_suite.py), with the "
                           "eager PyTorch mirror on its first case if torch is installed. memory: the same "
                           "cases' device memory as XLA plans it for --plan_target, and the largest batch that "
                           "fits (gmae_jax/bench/memory_plan.py; compiles, runs nothing).")
PLAN_TARGETS = ["cpu", "h100", "h200", "v5e", "v6e", "v5p"]  # memory_plan.TARGETS (tested)
_PLAN_TARGET = flags.DEFINE_enum("plan_target", "h100", PLAN_TARGETS,
                                 "--suite=memory: devices to plan for (GPUs need JAX's CUDA plugin, "
                                 "pip install -e '.[gpu-plan]'; TPUs libtpu, '.[tpu]'; no device).")
_PLAN_DEVICES = flags.DEFINE_integer("plan_devices", 1, "--suite=memory: devices of one host.", lower_bound=1)
_PLAN_FSDP = flags.DEFINE_integer("plan_fsdp", 1, "--suite=memory: the mesh's fsdp axis (divides --plan_devices).",
                                  lower_bound=1)
_PLAN_STEP_IMPL = flags.DEFINE_enum("plan_step_impl", "jit", ["jit", "shard_map"],
                                    "--suite=memory: the train step planned, as config.step_impl.")
_SUITE_PRESETS = flags.DEFINE_list("suite_presets", ["small", "base", "reference"], "--suite: presets, cheapest first.")
GROW = "max"  # --suite_batch_sizes=max
_SUITE_BATCH_SIZES = flags.DEFINE_list("suite_batch_sizes", [],
                                       "--suite: batch per preset, in --suite_presets' order, or one for all "
                                       "(device: halved until it fits); default small 256, base 128, reference 64. "
                                       "--suite=device: 'max' also measures each case at the largest power-of-two "
                                       "multiple of its default batch that its memory plan says fits.")
_SUITE_IMG_SIZE = flags.DEFINE_integer("suite_img_size", 224, "--suite: image size.")
_SUITE_BUDGET_S = flags.DEFINE_float("suite_budget_s", 420.0,
                                     "--suite=device: no case starts that is expected to end after this many "
                                     "seconds (the first case always runs).")
_SUITE_CASES = flags.DEFINE_list("suite_cases", [], "--suite: the cases to measure or plan, in this order, named as "
                                 "the table names them (e.g. 'reference pretrain bfloat16 encoder remat=fine'), "
                                 "instead of every case of --suite_presets.")
_SUITE_MIRROR = flags.DEFINE_bool("suite_mirror", True,
                                  "--suite=device: time the eager PyTorch mirror on the first case (if torch is "
                                  "installed); --nosuite_mirror where its number is known and the loan is short.")
_CHECKPOINT_SAVE = flags.DEFINE_bool(
    "checkpoint_save", False, "Checkpoint save time of --preset's train state: whole arrays vs replica-parallel.")
_MODEL_FLOPS = flags.DEFINE_bool(
    "model_flops", False, "Training GFLOP per image of every preset (matmuls and convolutions, from the jaxpr).")
_MODEL_OVERRIDE = flags.DEFINE_multi_string(
    "model_override", [], "--train_step, --profile_step, --sparse_vs_dense: FIELD=VALUE on the preset's "
    "architecture, e.g. img_size=64.")


# The benchmarks each tuning flag acts on: given to none of the chosen ones, it would be ignored silently.
_FLAG_USERS = {
    "num_images": {"--pipeline"}, "image_size": {"--pipeline"}, "crop_scale_min": {"--pipeline"},
    "repeats": {"--pipeline"}, "num_workers": {"--pipeline"},
    "preset": {"--train_step", "--profile_step", "--sparse_vs_dense", "--checkpoint_save"},
    "batch_size": {"--train_step", "--profile_step", "--sparse_vs_dense", "--pipeline"},
    "num_steps": {"--train_step", "--profile_step", "--sparse_vs_dense"},
    "rounds": {"--train_step", "--sparse_vs_dense"},
    "model_override": {"--train_step", "--profile_step", "--sparse_vs_dense"},
    "dtype": {"--profile_step"}, "vs_torch": {"--train_step", "--profile_step"},
    "tasks": {"--vs_torch", "--profile_step"}, "mask_ratio": {"--sparse_vs_dense", "--model_flops"},
    "suite_presets": {"--suite=device", "--suite=memory"}, "suite_batch_sizes": {"--suite=device", "--suite=memory"},
    "suite_img_size": {"--suite=device", "--suite=memory"}, "suite_budget_s": {"--suite=device"},
    "suite_mirror": {"--suite=device"},
    "plan_target": {"--suite=memory"}, "plan_devices": {"--suite=memory"}, "plan_fsdp": {"--suite=memory"},
    "plan_step_impl": {"--suite=memory"},
    "suite_cases": {"--suite=device", "--suite=memory"},
}


def refuse_unused_flags(chosen: set[str], present: Sequence[str]) -> None:
    """A flag none of the chosen benchmarks reads is a usage error (a `--dtype=bfloat16` meant for
    --profile_step would otherwise time float32 and say nothing)."""
    for name in present:
        users = _FLAG_USERS.get(name)
        if users is not None and not users & chosen:
            raise app.UsageError(f"--{name} applies to {', '.join(sorted(users))} only; it would be ignored here")


def parse_overrides(items: Sequence[str]) -> dict[str, object]:
    """['img_size=64', 'overlap_patches=True'] -> {'img_size': 64, 'overlap_patches': True}."""
    overrides: dict[str, object] = {}
    known = sorted(field.name for field in dataclasses.fields(GMSTConfig))
    for item in items:
        field, sep, text = item.partition("=")
        if not sep:
            raise app.UsageError(f"--model_override={item!r}: expected FIELD=VALUE, e.g. img_size=64")
        if field not in known:
            raise app.UsageError(f"--model_override={item!r}: {field!r} is not an architecture field; known: {known}")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a string such as mask_mode=original
        default = getattr(GMSTConfig(), field)
        kind = (int, float) if isinstance(default, float) else type(default)
        if isinstance(value, bool) != isinstance(default, bool) or not isinstance(value, kind):
            kind_name = type(default).__name__
            raise app.UsageError(f"--model_override={item!r}: {field} takes {'an' if kind_name[0] in 'aeiou' else 'a'} "
                                 f"{kind_name}, e.g. {field}={default!r}")
        overrides[field] = value
    return overrides


def check_models(presets: Sequence[str], batch_sizes: Sequence[int], where: str, **overrides: object) -> None:
    """Every preset and batch the chosen benchmark will build, checked before the first compile: on a
    short accelerator loan a bad value would otherwise fill the table with failed rows. Errors name the
    architecture's fields as `where` (the flags that set them) does, not as a stage's config."""
    for batch_size in batch_sizes:
        if batch_size < 1:
            raise app.UsageError(f"batch size {batch_size} must be at least 1")
    for preset in presets:
        try:
            config_checks.validate_model(config_lib.model_section(preset, **overrides))
        except ConfigError as error:
            message = str(error)
            if "config.model." not in message:  # e.g. an unknown preset
                raise
            raise app.UsageError(f"{where} (preset {preset}): {re.sub(r'(--)?config[.]model[.]', '', message)}"
                                 ) from None


def _grow_batches() -> bool:
    """--suite_batch_sizes=max: each case at its default batch, then at the largest that fits."""
    if _SUITE_BATCH_SIZES.value != [GROW] and GROW in _SUITE_BATCH_SIZES.value:
        raise app.UsageError(f"--suite_batch_sizes={GROW} stands alone (each case's default batch, then the "
                             "largest that fits)")
    if _SUITE_BATCH_SIZES.value == [GROW] and _SUITE.value != "device":
        raise app.UsageError(f"--suite_batch_sizes={GROW} is --suite=device's; --suite=memory finds the largest "
                             "batch that fits for every case anyway")
    return _SUITE_BATCH_SIZES.value == [GROW]


def _suite_batch_sizes(presets: Sequence[str]) -> list[int]:
    from gmae_jax.bench import suite_cases  # noqa: PLC0415 (model code only here)

    requested = [] if _grow_batches() else _SUITE_BATCH_SIZES.value
    if not all(b.isdigit() for b in requested):
        raise app.UsageError(f"--suite_batch_sizes={','.join(requested)}: give whole numbers, or {GROW} alone")
    try:
        return suite_cases.batch_sizes_for(presets, [int(b) for b in requested])
    except ValueError as error:
        raise app.UsageError(f"--suite_batch_sizes: {error}") from None


def run_device_suite(cases: Sequence[Any]) -> None:
    """The device table; the eager PyTorch mirror's line follows its first row (`suite_mirror.mirror_line`)."""
    host_memory.keep_freed_memory()
    from gmae_jax.bench import device_suite  # noqa: PLC0415 (model code only here)

    device_suite.main_suite(cases, _SUITE_BUDGET_S.value, num_steps=10, grow=_grow_batches(),
                            with_mirror=_SUITE_MIRROR.value)


def _suite_cases() -> list[Any]:
    """The cases --suite_cases names (each at its preset's batch, or the one --suite_batch_sizes
    gives), else every case of --suite_presets."""
    from gmae_jax.bench import suite_cases  # noqa: PLC0415 (model code only here)

    if not _SUITE_CASES.value:
        presets = _SUITE_PRESETS.value
        return suite_cases.default_cases(presets, _SUITE_IMG_SIZE.value, _suite_batch_sizes(presets))
    if len(_SUITE_BATCH_SIZES.value) > 1:
        raise app.UsageError("with --suite_cases, --suite_batch_sizes takes one value (for every case) or none "
                             "(each preset's default)")
    try:
        return [suite_cases.Case.from_name(name, img_size=_SUITE_IMG_SIZE.value,
                                           batch_size=_suite_batch_sizes(name.split()[:1])[0])
                for name in _SUITE_CASES.value]
    except ValueError as error:
        raise app.UsageError(f"--suite_cases: {error}") from None


def run_memory_plan(cases: Sequence[Any]) -> None:
    """The device suite's cases as XLA plans them for `--plan_target`, printed row by row."""
    from gmae_jax.bench import memory_plan  # noqa: PLC0415 (model code only here)

    # Before JAX starts its backends: lets JAX's CUDA plugin load on a machine without CUDA.
    name, _, value = memory_plan.CUDA_CHECK_OFF.partition("=")
    os.environ.setdefault(name, value)

    if _PLAN_DEVICES.value % _PLAN_FSDP.value:
        raise app.UsageError(f"--plan_fsdp={_PLAN_FSDP.value} must divide --plan_devices={_PLAN_DEVICES.value}")
    uneven = sorted({case.batch_size for case in cases if case.batch_size % _PLAN_DEVICES.value})
    if uneven:
        raise app.UsageError(f"batch sizes {uneven} do not split over --plan_devices={_PLAN_DEVICES.value}")
    if memory_plan.TARGETS[_PLAN_TARGET.value].platform == "cuda":  # also before JAX starts its backends
        os.environ["XLA_FLAGS"] = memory_plan.with_gpu_plan_flags(os.environ.get("XLA_FLAGS", ""))
    try:
        for line in memory_plan.plan_table(cases, _PLAN_TARGET.value, _PLAN_DEVICES.value, _PLAN_FSDP.value,
                                           _PLAN_STEP_IMPL.value):
            print(line, flush=True)
    except memory_plan.PlanError as error:
        raise app.UsageError(str(error)) from None


def main(argv: Sequence[str]) -> None:
    """The benchmark the flags choose; a bad choice of flags, preset or architecture is one line (absl
    would print this module's whole docstring above a UsageError), not a traceback."""
    logging.get_absl_handler().addFilter(quiet_logs.QuietLibraries())
    try:
        run_benchmarks(argv)
    except (ConfigError, app.UsageError) as error:
        sys.exit(f"error: {error} (--helpshort lists the flags)")


def run_benchmarks(argv: Sequence[str]) -> None:
    del argv
    chosen = {name for name, value in (
        ("--pipeline", _PIPELINE.value), ("--train_step", _TRAIN_STEP.value), (f"--suite={_SUITE.value}", _SUITE.value),
        ("--sparse_vs_dense", _SPARSE_VS_DENSE.value), ("--profile_step", _PROFILE_STEP.value),
        ("--model_flops", _MODEL_FLOPS.value), ("--checkpoint_save", _CHECKPOINT_SAVE.value)) if value}
    if not chosen:
        raise app.UsageError("choose a benchmark: --pipeline, --train_step, --profile_step, --sparse_vs_dense, "
                             "--model_flops, --checkpoint_save, --suite=device or --suite=memory")
    if len(chosen) > 1 and chosen != {"--pipeline", "--train_step"}:  # only that pair runs one after the other
        raise app.UsageError(f"choose one benchmark per run (got {', '.join(sorted(chosen))}); only --pipeline "
                             "and --train_step go together")
    present = [name for name in _FLAG_USERS if flags.FLAGS[name].present]
    refuse_unused_flags(chosen | ({"--vs_torch"} if _VS_TORCH.value else set()), present)
    if _SUITE.value:
        cases = _suite_cases()
        check_models(list(dict.fromkeys(case.preset for case in cases)), [case.batch_size for case in cases],
                     "--suite_img_size", img_size=_SUITE_IMG_SIZE.value)
    elif chosen & {"--train_step", "--profile_step", "--sparse_vs_dense"}:
        check_models([_PRESET.value], [_BATCH_SIZE.value], "--model_override",
                     **parse_overrides(_MODEL_OVERRIDE.value))
    if chosen & {"--profile_step"} or _VS_TORCH.value:
        from gmae_jax.bench.step_benchmark import TASKS  # noqa: PLC0415 (model code only here)

        unknown = sorted(set(_TASKS.value) - set(TASKS))
        if unknown:
            raise app.UsageError(f"--tasks: {', '.join(unknown)} is not one of {', '.join(TASKS)}")
    if _CHECKPOINT_SAVE.value:
        from gmae_jax.bench import checkpoint_benchmark  # noqa: PLC0415 (model code only here)

        results = checkpoint_benchmark.save_seconds(_PRESET.value)
        print(checkpoint_benchmark.markdown_table(_PRESET.value, results))
        return
    if _MODEL_FLOPS.value:
        from gmae_jax.models.presets import PRESETS  # noqa: PLC0415 (model code only here)
        from gmae_jax.bench import model_flops  # noqa: PLC0415

        print(model_flops.preset_table(PRESETS, _MASK_RATIO.value))
        return
    if _PROFILE_STEP.value:
        host_memory.keep_freed_memory()
        from gmae_jax.bench import step_benchmark  # noqa: PLC0415 (model code only here)

        step_benchmark.print_profile(_PRESET.value, _PROFILE_DTYPE.value, _TASKS.value, _BATCH_SIZE.value,
                                     _NUM_STEPS.value, parse_overrides(_MODEL_OVERRIDE.value), _VS_TORCH.value)
        return
    if _SPARSE_VS_DENSE.value:
        host_memory.keep_freed_memory()
        from gmae_jax.bench import sparse_benchmark  # noqa: PLC0415 (model code only here)

        sparse_benchmark.print_comparison(_PRESET.value, _BATCH_SIZE.value, _MASK_RATIO.value, _NUM_STEPS.value,
                                          _ROUNDS.value, **parse_overrides(_MODEL_OVERRIDE.value))
        return
    if _SUITE.value == "device":
        run_device_suite(cases)
        return
    if _SUITE.value == "memory":
        run_memory_plan(cases)
        return
    if _TRAIN_STEP.value:
        # Before JAX starts its threads: XLA:CPU's per-step buffers then reuse memory (see module).
        host_memory.keep_freed_memory()
    if _PIPELINE.value:
        pipeline_benchmark.run_view_benchmark(_NUM_IMAGES.value, _IMAGE_SIZE.value, _CROP_SCALE_MIN.value,
                                              _REPEATS.value)
        pipeline_benchmark.run_transport_benchmark(_IMAGE_SIZE.value, _BATCH_SIZE.value, _NUM_WORKERS.value)
    if _TRAIN_STEP.value:
        # Imported here: the pipeline benchmark needs no model code.
        from gmae_jax.bench import step_benchmark

        if _VS_TORCH.value:
            step_benchmark.run_vs_torch(_PRESET.value, _BATCH_SIZE.value, _NUM_STEPS.value, _ROUNDS.value,
                                        _TASKS.value, parse_overrides(_MODEL_OVERRIDE.value))
        else:
            step_benchmark.run_step_benchmark(_PRESET.value, _BATCH_SIZE.value, _NUM_STEPS.value, _ROUNDS.value,
                                              parse_overrides(_MODEL_OVERRIDE.value))

