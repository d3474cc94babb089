"""The train-step benchmarks run (their numbers go to BENCHMARKS.md, never asserted as speed)."""

import numpy as np
import pytest

from gmae_jax.bench import parse_overrides
from gmae_jax.train import step_benchmark
from gmae_jax.train.step_benchmark import gmst_config, jax_runner, pretrain_images_per_second, torch_runner

BATCH = 8  # one example per simulated device


def test_step_benchmark_measures_a_positive_rate():
    assert pretrain_images_per_second("micro", "float32", batch_size=BATCH, num_steps=1) > 0.0


def test_side_by_side_prints_a_table_with_the_ratio(capsys):
    rows = step_benchmark.run_vs_torch("micro", BATCH, num_steps=1, rounds=2, tasks=("pretrain", "finetune"))

    table = capsys.readouterr().out
    assert [row["task"] for row in rows] == ["pretrain", "finetune"]
    for row in rows:
        assert row["jax"] > 0 and row["torch"] > 0
        assert row["ratio"] == pytest.approx(row["jax"] / row["torch"])
        assert f"| {row['task']} | {row['jax']:.1f} | {row['torch']:.1f} | **{row['ratio']:.2f}x** |" in table
    assert "| step | JAX jit (float32) img/s | PyTorch eager (float32) img/s | JAX / PyTorch |" in table


@pytest.mark.parametrize("make_runner, bias, kernel", [
    (jax_runner, "['decoder_pred']['bias']", "['encoder']['blocks_0']['mscffn']['fc1']['kernel']"),
    (torch_runner, "decoder_pred.bias", "encoder.blocks.0.mscffn.fc1.weight"),
])
def test_both_sides_train_the_same_model(make_runner, bias, kernel):
    runner = make_runner(gmst_config("micro", "float32"), "pretrain", BATCH)
    before = runner.params()
    runner.step()
    after = runner.params()

    assert before.keys() == after.keys()
    # A bias is not weight-decayed: it moves only if gradients reach it.
    assert not np.array_equal(before[bias], after[bias])
    assert not np.array_equal(before[kernel], after[kernel])
    assert np.all(np.isfinite(after[kernel]))


def test_torch_mirror_has_the_jax_parameter_count():
    config = gmst_config("micro", "float32")
    jax_params = jax_runner(config, "finetune", BATCH).params()
    torch_params = torch_runner(config, "finetune", BATCH).params()
    # norm2 is in both; the counts match exactly when the mirror is the same model.
    assert sum(v.size for v in jax_params.values()) == sum(v.size for v in torch_params.values())


def test_model_overrides_parse_to_python_values():
    assert parse_overrides(["img_size=64", "overlap_patches=True", "mask_mode=original"]) == {
        "img_size": 64, "overlap_patches": True, "mask_mode": "original"}
