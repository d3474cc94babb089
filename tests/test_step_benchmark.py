"""The train-step benchmarks run (their numbers go to BENCHMARKS.md, never asserted as speed)."""

import numpy as np
import pytest

from gmae_jax.bench import parse_overrides
from gmae_jax.train.step_benchmark import compare, jax_runner, preset_architecture, markdown_table, torch_runner

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


def test_model_overrides_parse_to_python_values():
    assert parse_overrides(["img_size=64", "overlap_patches=True", "mask_mode=original"]) == {
        "img_size": 64, "overlap_patches": True, "mask_mode": "original"}
