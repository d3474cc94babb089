"""A run's files are written whole: readers see the old file or the new one, and no temporary file stays."""

import pytest

from gmae_jax import run_files


def test_a_write_whose_rename_fails_leaves_no_temporary_file(tmp_path):
    """A folder where the file goes: the rename failed after the write, and the temporary file stayed."""
    (tmp_path / "eval_metrics.json").mkdir()
    with pytest.raises(OSError, match="eval_metrics.json"):
        run_files.write_whole(tmp_path / "eval_metrics.json", lambda f: f.write(b"{}"))
    assert [path.name for path in tmp_path.iterdir()] == ["eval_metrics.json"]
