"""The command line as a user runs it: `python -m gmae_jax.main --config=... --workdir=...`."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gmae_jax.main", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_config_value_exits_with_one_line_error(tmp_path):
    result = run_main("--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path}",
                      f"--config.data.root={tmp_path}", "--config.mask_ratio=1.5")
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == "error: config.mask_ratio=1.5 must be in (0, 1), e.g. --config.mask_ratio=0.6"
    assert "Traceback" not in result.stderr


def test_wrong_folder_layout_names_the_folder(tmp_path):
    (tmp_path / "images").mkdir()
    result = run_main("--config=configs/pretrain.py:runlocal", f"--workdir={tmp_path / 'w'}",
                      f"--config.data.root={tmp_path}")
    assert result.returncode == 1
    assert str(tmp_path) in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_command_pretrains_finetunes_and_prints_accuracy(tmp_path):
    result = run_main(
        "--config=configs/demo.py", f"--workdir={tmp_path}",
        "--config.dataset.pretrain_train_per_class=8", "--config.dataset.finetune_train_per_class=8",
        "--config.dataset.finetune_val_per_class=4", "--config.pretrain.total_steps=4",
        "--config.finetune.total_steps=4", "--config.pretrain.batch_size=16", "--config.finetune.batch_size=16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "fine-tuned accuracy on" in result.stdout and "(chance 0.250)" in result.stdout
    assert "[pretrain] step 4/4" in result.stderr and "img/s" in result.stderr and "ETA" in result.stderr
    for path in ("pretrain/reconstructions.png", "finetune/confusion_matrix.png", "finetune/metrics.jsonl",
                 "pretrain/config.json", "finetune/classes.json", "data/finetune_dataset/.complete"):
        assert os.path.exists(tmp_path / path), path
