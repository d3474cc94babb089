"""The train-step benchmarks run (their numbers go to BENCHMARKS.md, never asserted as speed)."""

import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
from absl import app
from absl import flags as absl_flags

from gmae_jax.bench.cli import parse_overrides, refuse_unused_flags
from gmae_jax.bench import step_benchmark
from gmae_jax.bench.step_benchmark import compare, jax_runner, preset_architecture, markdown_table, torch_runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8  # one example per simulated device
# Per side: a parameter that is not weight-decayed (it moves only if gradients reach it) and a kernel.
WATCHED = {
    "jax": ("['{head}']['bias']", "['encoder']['blocks_0']['mscffn']['fc1']['kernel']"),
    "torch": ("{head}.bias", "encoder.blocks.0.mscffn.fc1.weight"),
}
HEADS = {("jax", "pretrain"): "decoder_pred", ("jax", "finetune"): "head",
         ("torch", "pretrain"): "decoder_pred", ("torch", "finetune"): "classifier.1"}


def test_side_by_side_trains_both_models_and_tabulates_the_ratio():
    config = preset_architecture("micro", "float32", {"depth": 1})  # every block kind once; half the compile
    rows = []
    for task in ("pretrain", "finetune"):
        runners = {"jax": jax_runner(config, task, BATCH), "torch": torch_runner(config, task, BATCH)}
        before = {side: runner.params() for side, runner in runners.items()}
        rows.append(compare(runners["jax"], runners["torch"], task, BATCH, num_steps=1, rounds=2))

        # Both sides are the same model and both actually train it.
        sizes = {side: sum(v.size for v in params.values()) for side, params in before.items()}
        assert sizes["jax"] == sizes["torch"], task
        for side, runner in runners.items():
            after = runner.params()
            bias, kernel = (name.format(head=HEADS[side, task]) for name in WATCHED[side])
            assert not np.array_equal(before[side][bias], after[bias]), (side, task)
            assert not np.array_equal(before[side][kernel], after[kernel]), (side, task)
            assert np.all(np.isfinite(after[kernel]))

    table = markdown_table(rows)
    assert table.splitlines()[0] == (
        "| step | JAX jit (float32) img/s | PyTorch eager (float32) img/s | JAX / PyTorch |")
    for row in rows:
        assert row["jax"] > 0 and row["torch"] > 0
        assert row["ratio"] == pytest.approx(row["jax"] / row["torch"])
        assert f"| {row['task']} | {row['jax']:.1f} | {row['torch']:.1f} | **{row['ratio']:.2f}x** |" in table


def test_float32_vs_bfloat16_times_both_steps_of_the_overridden_model(capsys, monkeypatch):
    built = {}

    def fake_runner(config, task, batch_size):  # the real one is the side by side's above
        built[config.dtype] = (config, task, batch_size)
        return step_benchmark.Runner(f"JAX jit ({config.dtype})", lambda: None, dict)

    monkeypatch.setattr(step_benchmark, "jax_runner", fake_runner)
    rates = step_benchmark.run_step_benchmark("micro", BATCH, num_steps=1, rounds=2,
                                              overrides={"img_size": 16, "patch_size": 2})

    assert set(built) == set(rates) == {"float32", "bfloat16"} and min(rates.values()) > 0
    for config, task, batch_size in built.values():
        assert (config.img_size, config.patch_size, task, batch_size) == (16, 2, "pretrain", BATCH)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("pretraining step, micro (16 px, patch 2, embed 32), batch 8; 8 x cpu (cpu); "
                               "median of 2 alternating rounds of 1 steps")
    assert f"x{rates['bfloat16'] / rates['float32']:.2f} vs float32" in lines[2]


def test_a_pipeline_batch_is_what_the_input_workers_yield():
    batch = step_benchmark.pipeline_batch(64, 16, 10, seed=0)
    assert batch["image"].dtype == np.uint8 and batch["image"].shape == (64, 16, 16, 3)
    assert batch["label"].dtype == np.int32 and 0 <= batch["label"].min() and batch["label"].max() < 10
    jitter = batch["color_jitter"]
    assert jitter.dtype == np.float32 and jitter.shape == (64, 8)
    factors, hue, order = jitter[:, :3], jitter[:, 3], jitter[:, 4:]  # the default strengths: 0.4 and 0.1 turns
    assert factors.min() >= 0.6 and factors.max() <= 1.4 and np.unique(factors).size > 100
    assert np.all(hue == np.round(hue)) and np.abs(hue).max() <= 25 and np.unique(hue).size > 5
    assert (np.sort(order, axis=1) == np.arange(4)).all() and len({tuple(row) for row in order}) > 10


def test_model_overrides_parse_to_python_values():
    assert parse_overrides(["img_size=64", "overlap_patches=True", "mask_mode=original"]) == {
        "img_size": 64, "overlap_patches": True, "mask_mode": "original"}
    with pytest.raises(app.UsageError, match=r"--model_override='bogus=1': 'bogus' is not an architecture field"):
        parse_overrides(["bogus=1"])
    with pytest.raises(app.UsageError, match=r"--model_override='img_size=abc': img_size takes an int, e.g. img_size="):
        parse_overrides(["img_size=abc"])
    with pytest.raises(app.UsageError, match=r"overlap_patches takes a bool"):
        parse_overrides(["overlap_patches=1"])
    assert parse_overrides(["mlp_ratio=2"]) == {"mlp_ratio": 2}  # an int where a float goes


@pytest.mark.parametrize("flags, message", [
    (["--train_step", "--batch_size=0"], "--batch_size"),
    (["--sparse_vs_dense", "--mask_ratio=1.5"], "--mask_ratio must be in (0, 1)"),
    (["--train_step", "--preset=nope", "--batch_size=8"], "unknown model preset 'nope'"),
    (["--model_flops", "--train_step"], "choose one benchmark per run (got --model_flops, --train_step)"),
    (["--model_flops", "--dtype=bfloat16"], "--dtype applies to --profile_step only"),
    (["--suite=memory", "--plan_devices=3", "--plan_fsdp=2"], "--plan_fsdp=2 must divide --plan_devices=3"),
    (["--suite=memory", "--plan_target=cpu", "--plan_devices=3"], "batch sizes [64, 128, 256] do not split"),
    (["--suite=memory", "--plan_target=cpu", "--plan_devices=16", "--suite_batch_sizes=32"], "16 CPU devices"),
    (["--suite=memory", "--suite_presets=small,base", "--suite_batch_sizes=1,2,3"], "3 batch sizes for 2 presets"),
    (["--suite=memory", "--suite_cases=small finetune bfloat16", "--suite_batch_sizes=1,2"], "takes one value"),
    (["--suite=memory", "--plan_target=cpu", "--suite_cases=small pretrain bfloat16 remat=block"],
     "did you mean 'small pretrain bfloat16 encoder remat=block'?"),
    # A loan's chosen cases are checked before the first compile too.
    (["--suite=device", "--suite_cases=small pretrain bfloat16 encoder,small pretrain bfloat16 conv=taps"],
     "did you mean 'small pretrain bfloat16 encoder conv=taps'?"),
    (["--suite=device", "--suite_cases=nope pretrain bfloat16 encoder"], "preset 'nope' is not one of"),
    (["--suite=device", "--suite_cases=small pretrain bfloat16 encoder", "--suite_img_size=30"],
     "img_size=30 is not divisible"),
    # Checked before the first compile: a loan's table would otherwise be rows of failures.
    (["--suite=memory", "--plan_target=cpu", "--suite_presets=nope"], "unknown model preset 'nope'"),
    (["--suite=device", "--suite_batch_sizes=0"], "batch size 0 must be at least 1"),
    (["--suite=device", "--suite_batch_sizes=8,max"], "--suite_batch_sizes=max stands alone"),
    (["--suite=device", "--suite_batch_sizes=big"], "--suite_batch_sizes=big: give whole numbers, or max alone"),
    (["--suite=memory", "--suite_batch_sizes=max"], "--suite_batch_sizes=max is --suite=device's"),
    (["--suite=device", "--suite_img_size=30"],
     "--suite_img_size (preset small): img_size=30 is not divisible by patch_size=16"),
    (["--train_step", "--vs_torch", "--tasks=nope", "--preset=micro"], "--tasks: nope is not one of pretrain"),
    (["--train_step", "--preset=micro", "--model_override=depth=0"],
     "--model_override (preset micro): depth=0 must be positive"),
])
def test_bad_benchmark_flags_are_usage_errors_not_tracebacks(flags, message):
    """In this process (a subprocess each cost ~6 s of imports): the flags are parsed as given (only
    they: a whole parse would also reset absl's logging flags for the tests after), then `cli.main`
    turns every refusal into the one `error: ...` line of sys.exit
    (test_a_bad_benchmark_flag_is_one_line_from_the_command_line runs the command itself)."""
    from absl import logging as absl_logging
    from absl.testing import flagsaver

    from gmae_jax.bench import cli

    given = dict((flag.removeprefix("--").split("=", 1) + ["true"])[:2] for flag in flags)
    handler = absl_logging.get_absl_handler()
    try:
        # os.environ too: the memory plan sets a CUDA switch before its checks; main filters absl's log.
        with flagsaver.as_parsed(**given), mock.patch.dict(os.environ), \
                mock.patch.object(handler, "filters", list(handler.filters)):
            with pytest.raises(SystemExit) as exit_info:
                cli.main([])
    except absl_flags.IllegalFlagValueError as error:  # absl's own bounds: "FATAL Flags parsing error"
        assert message in str(error)
        return
    line = str(exit_info.value.code)
    assert line.startswith("error: ") and "\n" not in line and message in line, line
    assert line.endswith("(--helpshort lists the flags)")


def test_a_bad_benchmark_flag_is_one_line_from_the_command_line():
    flags = ["--suite=device", "--suite_cases=small pretrain bfloat16 encoder,small pretrain bfloat16 conv=taps"]
    result = subprocess.run([sys.executable, "-m", "gmae_jax.bench", *flags], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --suite_cases: 'small pretrain bfloat16 conv=taps' does not name a case the same way; did you mean "
        "'small pretrain bfloat16 encoder conv=taps'? (--helpshort lists the flags)"], result.stderr


@pytest.mark.parametrize("chosen, present, refused", [
    ({"--train_step"}, ["dtype"], "--dtype applies to --profile_step only"),
    ({"--sparse_vs_dense"}, ["vs_torch"], "--vs_torch applies to --profile_step, --train_step only"),
    ({"--train_step"}, ["tasks"], "--tasks applies to --profile_step, --vs_torch only"),
    ({"--pipeline", "--train_step"}, ["num_images", "rounds"], None),
    ({"--train_step", "--vs_torch"}, ["tasks", "vs_torch"], None),
    ({"--suite=device"}, ["suite_presets", "preset"], "--preset applies to"),
    ({"--suite=device"}, ["plan_target"], "--plan_target applies to --suite=memory only"),
    ({"--suite=device"}, ["plan_step_impl"], "--plan_step_impl applies to --suite=memory only"),
    ({"--suite=memory"}, ["suite_mirror"], "--suite_mirror applies to --suite=device only"),
])
def test_a_flag_no_chosen_benchmark_reads_is_refused(chosen, present, refused):
    if refused is None:
        refuse_unused_flags(chosen, present)
    else:
        with pytest.raises(app.UsageError, match=re.escape(refused)):
            refuse_unused_flags(chosen, present)


def test_helpshort_lists_the_benchmarks_flags():
    """Every bench error ends with "(--helpshort lists the flags)": the flags live in cli.py, not __main__."""
    result = subprocess.run([sys.executable, "-m", "gmae_jax.bench", "--helpshort"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    for flag in ("--suite_cases", "--train_step", "--sparse_vs_dense", "--model_override"):
        assert flag in result.stdout, result.stdout[-2000:]
    assert "--suite=device" in result.stdout and "--sparse_vs_dense" in result.stdout.split("flags:")[0]


def test_every_tuning_flags_help_names_the_benchmarks_that_read_it():
    from absl import flags as absl_flags

    from gmae_jax.bench import cli

    for name, users in cli._FLAG_USERS.items():
        help_text = absl_flags.FLAGS[name].help
        suite_users = {user for user in users if user.startswith("--suite=")}
        for user in users - suite_users:
            assert user in help_text, (name, user, help_text)
        if suite_users and not (len(suite_users) == 2 and "--suite:" in help_text):
            for user in suite_users:
                assert user in help_text, (name, user, help_text)


@pytest.mark.parametrize("name, kind", [
    ("aten::convolution_backward", "convolution"), ("aten::mkldnn_convolution", "convolution"),
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::bmm", "matmul"),
    ("aten::native_batch_norm_backward", "reduction"), ("aten::sum.dim_IntList", "reduction"),
    ("aten::_softmax", "reduction"), ("aten::copy_", "data movement"), ("aten::cat", "data movement"),
    ("aten::gelu_backward", "elementwise"), ("aten::addcdiv_", "elementwise"),
    ("autograd::engine::evaluate_function: MmBackward0", None), ("Optimizer.step#AdamW.step", None),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", None),  # a CUDA kernel: its aten op counts its time
])
def test_pytorch_ops_fall_into_the_jax_profiles_kinds(name, kind):
    from gmae_jax.bench import torch_step_profile as torch_profile

    assert torch_profile.aten_kind(name) == kind


def test_the_pytorch_steps_time_by_kind_sits_beside_the_jax_profile():
    from gmae_jax.bench import step_benchmark, step_profile

    config = preset_architecture("micro", "float32", {"depth": 1})
    theirs = step_benchmark.torch_kind_ms(config, "finetune", 4, num_steps=1)
    assert theirs["convolution"] > 0 and theirs["matmul"] > 0 and theirs["reduction"] > 0, theirs
    ours = step_profile.StepProfile({"conv.1": 3.0, "dot.2": 1.0}, {
        "conv.1": step_profile.HloOp("convolution", "forward", "encoder"),
        "dot.2": step_profile.HloOp("matmul", "forward", "encoder")}, 4.5)
    table = step_benchmark.kinds_vs_torch_table(ours, {"convolution": 2.0, "matmul": 4.0, "elementwise": 1.0})
    assert "| convolution | 3.0 | 2.0 | 1.50x |" in table and "| matmul | 1.0 | 4.0 | 0.25x |" in table
    assert "| elementwise | 0.0 | 1.0 | 0.00x |" in table and table.endswith("| all | 4.0 | 7.0 | 0.57x |")


def test_a_cpu_ratio_measured_on_busy_cores_comes_with_a_warning():
    from gmae_jax.bench.step_benchmark import busy_machine_warning

    assert busy_machine_warning(0.3, 0.9, cores=2, on_cpu=True) is None
    warning = busy_machine_warning(0.4, 5.6, cores=2, on_cpu=True)
    assert warning.startswith("warning: load average 5.6 on 2 cores") and "idle machine" in warning
    assert busy_machine_warning(9.0, 9.0, cores=16, on_cpu=False) is None  # a GPU side-by-side: not CPU contention
