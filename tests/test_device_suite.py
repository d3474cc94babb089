"""The accelerator benchmark suite runs end to end on CPU (its numbers go to BENCHMARKS.md)."""

import dataclasses
import os
import re
import subprocess

import jax
import numpy as np
import pytest

from gmae_jax.bench import device_suite, model_flops, step_benchmark, suite_cases, suite_mirror
from gmae_jax.bench.suite_cases import Case
from gmae_jax.train import init_compile


def test_suite_prints_a_markdown_row_per_case(monkeypatch, capsys):
    compiles = []
    compile_lowered = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, *args, **kwargs: compiles.append(1) or compile_lowered(self, *args, **kwargs))
    monkeypatch.setattr(init_compile, "_compiled", type(init_compile._compiled)())  # no initialiser from other tests
    timed_batches = []
    build = step_benchmark.build_train_step
    monkeypatch.setattr(step_benchmark, "build_train_step",
                        lambda *args, **kwargs: timed_batches.append((bench := build(*args, **kwargs)).batch) or bench)
    # One case (each costs two compiles); the other variants' names and FLOPs are checked below.
    cases = [Case("micro", "pretrain", dtype="float32", batch_size=8, img_size=32, depth=1)]
    monkeypatch.setattr(device_suite, "_device_capacity", lambda: 2 * 10**9)  # a CPU states no limit
    order = []
    for name, module in (("time_mirror", suite_mirror), ("make_mesh", device_suite.sharding)):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: order.append(name) or real(*a, **k))
    lines = list(device_suite.run_suite(cases, budget_s=600, num_steps=1))
    assert order == ["time_mirror", "make_mesh"]  # the mirror has the device to itself: JAX keeps what it takes
    assert lines[1] == device_suite.HEADER
    rows = [line for line in lines if line.startswith("| micro")]
    assert len(rows) == 1, lines
    cells = rows[0].strip("|").split("|")
    assert cells[0].strip() == "micro pretrain float32 encoder depth=1" and int(cells[1]) == 8
    assert float(cells[3]) > 0 and float(cells[6]) > 0  # img/s, GFLOPs per image
    assert cells[7].strip() == "n/a"  # no peak FLOP/s known for a CPU
    assert cells[8] == cells[5]  # planned GB; a CPU has no memory_stats, so its peak is the plan
    assert int(cells[9]) > 8 and int(cells[9]) % 8 == 0  # the batch that would fit 2 GB, in rows of 8 devices
    # Model FLOPs from the jaxpr.
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "float32"), depth=1)
    assert float(cells[6]) == pytest.approx(suite_cases.flops_per_image(cases[0]) / 1e9, abs=0.005)
    assert suite_cases.flops_per_image(cases[0]) == model_flops.train_step_flops(
        config, "pretrain", 4, mask_ratio=suite_cases.MASK_RATIO, num_classes=suite_cases.NUM_CLASSES) / 4
    assert lines[-1].startswith("total")
    # Every case times the step a training run runs: on uint8 batches with the workers' colour jitter.
    assert [(batch["image"].dtype, batch["color_jitter"].shape) for batch in timed_batches] == \
        [(np.uint8, (8, 8))] * len(cases)
    # Right after the first row (a loan cut short keeps them): the eager PyTorch mirror of that case
    # with the ratio, then where that step spends its time.
    torch_line = lines[lines.index(rows[0]) + 1]
    assert torch_line.startswith("PyTorch mirror of micro pretrain float32 encoder depth=1 (eager, torch "), torch_line
    torch_rate, ratio = re.search(r"batch 8: ([\d.]+) img/s; JAX / PyTorch \*\*([\d.]+)x\*\*", torch_line).groups()
    # The ratio of the unrounded rates: within what rounding each printed rate to 0.1 (and it to 0.01) allows,
    # which is wide where PyTorch's rate is small (its threads wait on each other on a busy machine).
    jax_rate, torch_rate = float(cells[3]), float(torch_rate)
    lowest, highest = (jax_rate - 0.05) / (torch_rate + 0.05), (jax_rate + 0.05) / (torch_rate - 0.05)
    assert lowest - 0.005 <= float(ratio) <= highest + 0.005
    profile = "\n".join(lines[lines.index(rows[0]) + 2:-1])
    assert "where the time goes: micro pretrain float32 encoder depth=1, batch 8" in profile
    kinds = {cells[1].strip(): float(cells[3].strip(" %")) for cells in
             (line.split("|") for line in profile.splitlines()) if len(cells) == 7 and "%" in cells[3]
             and cells[1].strip() in ("matmul", "convolution", "elementwise", "reduction")}
    assert kinds["matmul"] > 0 and kinds["convolution"] > 0, profile
    assert "| encoder/blocks/" in profile, profile  # layers by name
    assert "| communication |" in profile  # 8 simulated devices: gradient and BatchNorm all-reduces
    # What the trace alone cannot say: the step's untraced time (the row's) and the rate of its matmuls
    # and convolutions, from the row's model FLOPs (per device; no peak known for a CPU).
    assert f"ms traced step ({cells[4].strip()} ms untraced)" in profile, profile
    per_device = suite_cases.flops_per_image(cases[0]) * 8 / jax.device_count()
    assert f"matmuls and convolutions: the model's {per_device / 1e12:.3g} TFLOP per step and device in " in profile
    # Per case its initialiser and its step: the profile traces the step that was timed.
    assert len(compiles) == 2 * len(cases)
    # Progress on stderr says where a call that ran out of time stopped, compile split from lowering.
    progress = capsys.readouterr().err
    assert re.search(r"\] micro pretrain float32 encoder depth=1, batch 8: traced and lowered in [\d.]+ s; compiling\n"
                     r"\[[\d:]+\] micro pretrain float32 encoder depth=1, batch 8: XLA compiled in [\d.]+ s; timing",
                     progress), progress


def test_a_profile_that_fails_costs_the_row_nothing(monkeypatch):
    """The per-op profile path runs on a GPU only when a loan asks for it: an error there (an OOM-like one
    too, which must not halve the batch and compile again) leaves the measured row and says why."""
    def no_trace(*args, **kwargs):
        raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while exporting the trace\nmore")

    monkeypatch.setattr(device_suite.step_profile, "profile_compiled", no_trace)
    cases = [Case("micro", "pretrain", dtype="float32", batch_size=8, img_size=32, depth=1)]
    lines = list(device_suite.run_suite(cases, budget_s=600, num_steps=1, with_mirror=False))
    rows = [line for line in lines if line.startswith("| micro")]
    assert len(rows) == 1 and "failed" not in rows[0] and rows[0].split(" | ")[1] == "8", lines
    assert lines[lines.index(rows[0]) + 1] == "PyTorch mirror: not timed in this call (--nosuite_mirror)"
    assert ("no profile: RuntimeError: RESOURCE_EXHAUSTED: out of memory while exporting the trace" in lines), lines


def test_a_variants_row_names_it_and_its_flops_leave_recomputation_out():
    case = Case("micro", "finetune", remat="block", batch_size=8, img_size=32, depth=1, conv_impl="matmul")
    assert case.name == "micro finetune bfloat16 remat=block depth=1 conv=matmul"
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "float32"), depth=1, remat="block")
    assert suite_cases.flops_per_image(case) == model_flops.train_step_flops(
        config, "finetune", 4, mask_ratio=suite_cases.MASK_RATIO, num_classes=suite_cases.NUM_CLASSES) / 4


def test_cases_after_the_budget_are_listed_as_skipped(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
    cases = [Case("micro", "pretrain", batch_size=8, img_size=32)] * 2
    lines = list(device_suite.run_suite(cases, budget_s=-1, num_steps=1, with_mirror=False))
    assert any(line.startswith("skipped") and line.count("micro pretrain") == 2 for line in lines)
    # The numbers say how they were made.
    assert "XLA_FLAGS='--xla_gpu_enable_triton_gemm=false'" in lines[0]
    assert lines[0].endswith("conv_impl=auto: window convolutions as XLA's convolutions; MFU n/a (peak of this device "
                             "unknown)")  # on CPU


def test_a_case_that_would_end_past_the_budget_is_not_started(monkeypatch):
    """The call's time limit would cut it off mid-compile: minutes of a loan for no row."""
    clock = [0.0]
    monkeypatch.setattr(device_suite.time, "perf_counter", lambda: clock[0])

    def measure(case, mesh, num_steps, profile_steps=0, smallest=0):
        clock[0] += 300.0  # each case takes 5 minutes
        return {"batch": case.batch_size, "compile_s": 200.0, "img_per_s": 10.0, "step_ms": 800.0, "peak_gb": 1.0,
                "planned_gb": 1.0, "flops_per_img": 1e9, "fits_batch": None, "profile": None}

    monkeypatch.setattr(device_suite, "measure_fitting", measure)
    monkeypatch.setattr(device_suite, "CASE_SECONDS", {"mini": 250.0})
    cases = [Case("micro", "pretrain", batch_size=8, img_size=32), Case("micro", "finetune", batch_size=8, img_size=32),
             Case("mini", "pretrain", batch_size=8, img_size=32)]
    lines = list(device_suite.run_suite(cases, budget_s=700, num_steps=1, with_mirror=False))
    # The second micro case is expected to take what the first took (300 s: ends at 600); mini's 250 s would end
    # at 850.
    assert [line.split(" |")[0] for line in lines if line.startswith("| mi")] == ["| micro pretrain bfloat16 encoder",
                                                                                 "| micro finetune bfloat16"]
    assert "skipped (would end past the 700 s budget): mini pretrain bfloat16 encoder" in lines


# A fake python that prints the XLA_FLAGS the suite would run with; with `reject`, it fails like an
# XLA that does not know the flag when the launcher tries it.
FAKE_PYTHON = """#!/bin/sh
if [ "$1" = "-c" ]; then
  [ "$JAX_PLATFORMS" = cpu ] || exit 1  # the flags are tried on the CPU backend: no GPU start-up per flag
  case "$XLA_FLAGS" in *triton_gemm*) [ -n "$REJECT" ] && exit 1 ;; esac
  exit 0
fi
echo "flags:$XLA_FLAGS"
echo "args:$*"
echo "platforms:$JAX_PLATFORMS"
"""


LAUNCHER_ENV = ("XLA_FLAGS", "XLA_DEFAULTS", "REJECT", "PROFILE_OPS", "CASES", "BATCH_SIZES", "PRESETS", "BUDGET_S",
                "NO_MIRROR", "JAX_PLATFORMS")


def run_launcher(tmp_path, **env: str | None) -> subprocess.CompletedProcess:
    """launch/bench_device.sh with FAKE_PYTHON as its python, the environment's launcher settings
    cleared and `env`'s set (a None leaves one unset)."""
    fake_python = tmp_path / "python"
    fake_python.write_text(FAKE_PYTHON)
    fake_python.chmod(0o755)
    environment = {name: value for name, value in os.environ.items() if name not in LAUNCHER_ENV}
    environment.update(PYTHON=str(fake_python), OUT_FILE=str(tmp_path / "table.md"))
    environment.update({name: value for name, value in env.items() if value is not None})
    launcher = os.path.join(os.path.dirname(__file__), "..", "launch", "bench_device.sh")
    return subprocess.run(["bash", launcher], env=environment, capture_output=True, text=True, check=True)


@pytest.mark.parametrize("xla_defaults, reject, flag_expected", [(None, None, True), ("1", None, False),
                                                                 (None, "1", False)])
def test_the_launcher_sends_gemms_to_cublas_unless_asked_or_unknown(tmp_path, xla_defaults, reject, flag_expected):
    run = run_launcher(tmp_path, XLA_DEFAULTS=xla_defaults, REJECT=reject)
    assert run.stdout.startswith("flags:"), run.stdout  # the suite ran either way
    assert ("--xla_gpu_enable_triton_gemm=false" in run.stdout) == flag_expected, run.stdout
    assert ("does not take" in run.stderr) == bool(reject), run.stderr
    assert "autotune_level" not in run.stdout  # autotuning off made session 8's H200 step 79x slower


@pytest.mark.parametrize("reject", [None, "1"])
def test_the_launcher_turns_cuda_graphs_off_for_a_per_op_profile(tmp_path, reject):
    # An XLA without the GEMM flag (REJECT) still gets the profiling one.
    run = run_launcher(tmp_path, PROFILE_OPS="1", REJECT=reject)
    flags_line = run.stdout.splitlines()[0]
    assert flags_line.endswith(" --xla_gpu_enable_command_buffer="), run.stdout
    assert ("--xla_gpu_enable_triton_gemm=false" in flags_line) != bool(reject), run.stdout


@pytest.mark.parametrize("cases, batch_sizes", [(None, None),
                                                ("small finetune bfloat16,base pretrain bfloat16 sparse", "8")])
def test_the_launcher_measures_the_cases_named(tmp_path, cases, batch_sizes):
    args = run_launcher(tmp_path, CASES=cases, BATCH_SIZES=batch_sizes).stdout.splitlines()[1]
    assert f"--suite_cases={cases or ''} " in args and f"--suite_batch_sizes={batch_sizes or ''} " in args, args


@pytest.mark.parametrize("no_mirror, flag", [(None, "--suite_mirror"), ("1", "--nosuite_mirror")])
def test_the_launcher_leaves_the_mirror_out_when_asked(tmp_path, no_mirror, flag):
    run = run_launcher(tmp_path, NO_MIRROR=no_mirror)
    assert run.stdout.splitlines()[1].endswith(f" {flag}"), run.stdout
    assert run.stdout.splitlines()[2] == "platforms:"  # the suite itself runs on the accelerator


def test_a_batch_that_does_not_fit_is_halved(monkeypatch):
    tried = []

    def fake_measure(case, mesh, num_steps, profile_steps=0):
        tried.append(case.batch_size)
        if case.batch_size > 32:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return {"batch": case.batch_size}

    monkeypatch.setattr(device_suite, "measure", fake_measure)
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
    assert device_suite.measure_fitting(Case("small", "pretrain", batch_size=128), mesh, 1) == {"batch": 32}
    assert tried == [128, 64, 32]


def test_every_presets_headline_case_comes_first_and_mfu_uses_the_device_peak():
    cases = suite_cases.default_cases()
    # A short loan still measures reference's bf16 pretraining MFU: the bf16 dense pretraining step of
    # every preset, smallest first, before any variant.
    assert [c.name for c in cases[:3]] == ["small pretrain bfloat16 encoder", "base pretrain bfloat16 encoder",
                                          "reference pretrain bfloat16 encoder"]
    assert {"small pretrain bfloat16 sparse", "base finetune bfloat16", "reference pretrain float32 encoder remat=block",
            "small pretrain bfloat16 encoder remat=block", "reference pretrain bfloat16 encoder remat=block"} \
        <= {c.name for c in cases[3:]}
    assert len({c.name for c in cases}) == len(cases) == 17
    # If time is left: tap sums and cuDNN against im2col matmuls.
    assert [c.name for c in cases[-2:]] == ["small pretrain bfloat16 encoder conv=taps",
                                            "small pretrain bfloat16 encoder conv=xla"]
    assert {c.preset: c.batch_size for c in cases} == suite_cases.DEFAULT_BATCH_SIZES

@pytest.mark.parametrize("kind, bfloat16, float32", [
    ("NVIDIA H100 80GB HBM3", 989e12, 494e12), ("NVIDIA H200", 989e12, 494e12), ("NVIDIA GH200 480GB", 989e12, 494e12),
    ("NVIDIA H100 PCIe", 756e12, 378e12), ("NVIDIA H100 NVL", 835e12, 418e12), ("NVIDIA H200 NVL", 835e12, 418e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12), ("NVIDIA L40S", 362e12, 183e12), ("NVIDIA L40", 181e12, 90e12),
    ("NVIDIA L4", 121e12, 60e12), ("TPU v5 lite", 197e12, 197e12), ("TPU v5", 459e12, 459e12),
    ("TPU v5p", 459e12, 459e12), ("TPU v6 lite", 918e12, 918e12), ("TPU v4", 275e12, 275e12),
    ("NVIDIA B200", None, None), ("cpu", None, None)])
def test_mfu_is_computed_against_the_peak_of_that_very_card(kind, bfloat16, float32):
    """By the first pattern that matches: 'TPU v5' (a v5p) once took v5e's peak, an L40S an L4's."""
    device = dataclasses.make_dataclass("Device", ["device_kind"])(kind)
    assert (device_suite.peak_flops(device, "bfloat16"), device_suite.peak_flops(device, "float32")) == (bfloat16,
                                                                                                        float32)
    assert device_suite.peaks_line(device) == (f"MFU against bfloat16 {bfloat16 / 1e12:.0f} / float32 "
                                               f"{float32 / 1e12:.0f} TFLOP/s per device" if bfloat16 else
                                               "MFU n/a (peak of this device unknown)")


def test_the_pytorch_mirror_halves_a_batch_it_cannot_fit(monkeypatch):
    import torch

    from gmae_jax.torch_mirror import train_step

    tried = []

    def fake_make_step(config, task, batch_size, **_):
        tried.append(batch_size)
        if batch_size > 2:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return None, lambda: 0.0

    monkeypatch.setattr(train_step, "make_step", fake_make_step)
    mirror = suite_mirror.time_mirror(Case("micro", "pretrain", batch_size=8, img_size=32), num_steps=1)
    line = suite_mirror.mirror_line(mirror, {"batch": 8, "img_per_s": 100.0})
    assert tried == [8, 4, 2] and ", batch 2: " in line
    # Eager PyTorch at a quarter of JAX's batch is another measurement: no ratio.
    assert line.endswith("; no ratio: JAX ran at batch 8") and "**" not in line
    assert suite_mirror.mirror_line(mirror, None).endswith("; no ratio: the JAX case failed")


def test_the_pytorch_ratio_is_per_device_and_names_what_is_not_like_for_like(monkeypatch):
    from gmae_jax.torch_mirror import train_step

    seen = []
    monkeypatch.setattr(train_step, "make_step", lambda config, task, batch_size, **kwargs: (
        seen.append(kwargs["bfloat16"]), (None, lambda: 0.0))[1])
    # Three windows of 1, 2 and 1 s for 8 images: the median counts.
    monkeypatch.setattr(step_benchmark.time, "perf_counter", iter([0.0, 1.0, 1.0, 3.0, 3.0, 4.0]).__next__)
    mirror = suite_mirror.time_mirror(Case("micro", "pretrain", "float32", "sparse", batch_size=8, img_size=32), 1)
    line = suite_mirror.mirror_line(mirror, {"batch": 8, "img_per_s": 64.0}, num_devices=4)
    assert seen == [False]  # a float32 case: no bf16 autocast on a GPU either
    assert line.startswith("PyTorch mirror of micro pretrain float32 sparse (eager, torch ")
    assert ", one CPU), batch 8: 8.0 img/s" in line
    assert line.endswith("; JAX / PyTorch **2.00x** (JAX per device, of 4), not like for like: the mirror computes "
                         "sparse masking densely")


def test_a_case_is_found_again_from_its_name():
    cases = suite_cases.default_cases() + [Case("micro", "finetune", depth=1, conv_impl="matmul", batch_size=8)]
    for case in cases:
        assert Case.from_name(case.name, batch_size=case.batch_size, img_size=case.img_size) == case
    for bad in ("small", "small train bfloat16", "small pretrain bfloat16 encoder remat", "small pretrain x y=1",
                "nope pretrain float32 encoder", "small pretrain f16 encoder", "small pretrain float32 bogus",
                "small finetune float32 remat=wat", "small finetune float32 conv=zzz", "small finetune float32 depth=x"):
        with pytest.raises(ValueError, match="case name|none of|does not name|is not one of|whole number"):
            Case.from_name(bad)


def test_each_preset_has_its_batch_unless_told():
    assert suite_cases.batch_sizes_for(["reference"], []) == [64]
    assert suite_cases.batch_sizes_for(["small", "base", "reference", "mini"], []) == [256, 128, 64, 128]
    assert suite_cases.batch_sizes_for(["small", "base"], [32]) == [32, 32]
    with pytest.raises(ValueError, match="3 batch sizes for 2 presets"):
        suite_cases.batch_sizes_for(["small", "base"], [1, 2, 3])


def test_the_batch_that_fits_is_read_off_the_plans_line():
    # 10 GB of state, 2 GB more at batch 64 (31.25 MB per image): 85 % of 80 GB leaves 58 GB for images.
    assert device_suite.batch_that_fits(64, 12 * 10**9, 10 * 10**9, 80 * 10**9, 8) == 1856
    assert device_suite.batch_that_fits(64, 12 * 10**9, 10 * 10**9, 80 * 10**9, 48) == 1824
    assert device_suite.batch_that_fits(64, 12 * 10**9, 10 * 10**9, 11 * 10**9, 8) == 0  # not even the state
    assert device_suite.grown_batch(64, 1856) == 1024 and device_suite.grown_batch(64, 127) is None
    assert device_suite.grown_batch(256, 10**6) == device_suite.MAX_BATCH and device_suite.grown_batch(8, None) is None


def test_with_grow_a_case_is_measured_again_at_the_largest_batch_that_fits(monkeypatch):
    measured = []

    def fake_measure(case, mesh, num_steps, profile_steps=0):
        measured.append(case.batch_size)
        return {"batch": case.batch_size, "compile_s": 1.0, "img_per_s": 10.0 * case.batch_size, "step_ms": 100.0,
                "peak_gb": 1.0, "flops_per_img": 1e9, "planned_gb": 1.0, "fits_batch": 100, "profile": None}

    monkeypatch.setattr(device_suite, "measure", fake_measure)
    cases = [Case("micro", "pretrain", batch_size=8, img_size=32), Case("micro", "finetune", batch_size=64)]
    rows = [line for line in device_suite.run_suite(cases, budget_s=600, num_steps=1, grow=True, with_mirror=False)
            if line.startswith("| micro")]
    assert measured == [8, 64, 64] and [row.split("|")[2].strip() for row in rows] == ["8", "64", "64"]
    assert rows[0].endswith("| 100 |")  # the estimate the next row grew to
    measured.clear()
    list(device_suite.run_suite(cases, budget_s=600, num_steps=1, with_mirror=False))  # without grow: each once
    assert measured == [8, 64]


def test_a_failed_case_is_a_row_and_the_next_case_still_runs(monkeypatch):
    """Out of memory at the grown batch keeps the case's own row; an error without a message (a bare
    MemoryError) is a row too, not the end of the loan's table. The grown batch is not halved back to the
    case's own: that row is in the table already."""
    tried = []

    def fake_measure(case, mesh, num_steps, profile_steps=0):
        tried.append((case.stage, case.batch_size))
        if case.stage == "finetune":
            raise MemoryError()
        if case.batch_size > 8:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9 GB\nmore detail")
        return {"batch": case.batch_size, "compile_s": 1.0, "img_per_s": 80.0, "step_ms": 100.0, "peak_gb": 1.0,
                "flops_per_img": 1e9, "planned_gb": 1.0, "fits_batch": 16, "profile": None}

    monkeypatch.setattr(device_suite, "measure", fake_measure)
    cases = [Case("micro", "finetune", batch_size=8), Case("micro", "pretrain", batch_size=8, img_size=32)]
    # The mirror of a 224 px case would take minutes on CPU: a stand-in, as it had been timed.
    monkeypatch.setattr(suite_mirror, "time_mirror", lambda case, num_steps: suite_mirror.MirrorRun(
        case, case.batch_size, 50.0, "PyTorch mirror of micro finetune bfloat16 (...), batch 8: 50.0 img/s"))
    lines = list(device_suite.run_suite(cases, budget_s=600, num_steps=1, grow=True))
    rows = [line for line in lines if line.startswith("| micro")]
    assert rows[0] == "| micro finetune bfloat16 | failed: MemoryError:  |"
    assert lines[lines.index(rows[0]) + 1].endswith("batch 8: 50.0 img/s; no ratio: the JAX case failed")
    assert rows[1].startswith("| micro pretrain bfloat16 encoder | 8 |")
    assert rows[2] == ("| micro pretrain bfloat16 encoder | failed at batch 16: RuntimeError: RESOURCE_EXHAUSTED: "
                       "Out of memory while trying to allocate 9 GB |")
    assert tried == [("finetune", 8), ("pretrain", 8), ("pretrain", 16)]


def test_a_peak_an_earlier_case_set_is_marked_as_a_bound():
    result = {"batch": 8, "compile_s": 1.0, "img_per_s": 10.0, "step_ms": 800.0, "peak_gb": 12.0,
              "flops_per_img": 1e9, "planned_gb": 3.0, "peak_is_earlier": True}
    cells = device_suite.format_row(Case("micro", "pretrain"), result, jax.devices()[0], 1).strip("|").split("|")
    assert cells[5].strip() == "<= 12.00" and cells[8].strip() == "3.00"
