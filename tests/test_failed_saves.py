"""A checkpoint save that fails in orbax's background thread is raised by the watch, from orbax's log
record of it, before any later save waits for it (in a job of several processes that wait never ends;
tests/test_multiprocess.py runs such a job)."""

import errno
import logging as pylogging
import time

import jax.numpy as jnp
import orbax.checkpoint as ocp
import pytest
from absl import logging as absl_logging
from orbax.checkpoint._src.checkpointers import async_checkpointer

from gmae_jax.train import checkpoint, run_folder
from gmae_jax.train.failed_saves import FailedSaveWatch


@pytest.fixture
def full_disk(monkeypatch):
    """The first save's writes end, then its commit fails as on a full disk."""
    real = async_checkpointer._background_wait_for_commit_futures
    saves = []

    def failing(directory, commit_futures, *args, **kwargs):
        saves.append(directory)
        if len(saves) == 1:
            for future in commit_futures:
                future.result()
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return real(directory, commit_futures, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_background_wait_for_commit_futures", failing)


def _save(manager: ocp.CheckpointManager, step: int) -> None:
    manager.save(step, args=ocp.args.Composite(**{checkpoint.STATE_ITEM: ocp.args.StandardSave({"w": jnp.ones(4)})}))


def test_a_save_that_fails_in_the_background_is_raised_at_the_next_step(full_disk, tmp_path):
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), max_to_keep=2)
    watch = FailedSaveWatch()
    try:
        _save(manager, 2)
        deadline = time.monotonic() + 60
        while watch.failure is None and time.monotonic() < deadline:
            watch.raise_if_failed()  # nothing to raise until the background thread fails
            time.sleep(0.05)
        with pytest.raises(OSError, match="No space left on device") as raised:
            watch.raise_if_failed()
        assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("2")
        with pytest.raises(OSError, match="No space left on device"):
            watch.wait(manager)  # and again where the next save would wait for it
    finally:
        watch.close()
    assert run_folder.checkpoint_steps(str(tmp_path)) == []  # on disk: nothing that looks complete


def test_a_save_that_succeeds_raises_nothing_and_the_watch_leaves_no_handler(tmp_path):
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), max_to_keep=2)
    watch = FailedSaveWatch()
    _save(manager, 2)
    watch.wait(manager)
    watch.raise_if_failed()
    watch.close()
    assert run_folder.checkpoint_steps(str(tmp_path)) == [2]
    assert watch not in pylogging.getLogger("absl").handlers


def test_other_error_records_are_not_taken_for_a_failed_save():
    from absl import logging

    watch = FailedSaveWatch()
    try:
        try:
            raise ValueError("unrelated")
        except ValueError:
            logging.exception("a restore failed")
        watch.raise_if_failed()
    finally:
        watch.close()
    assert watch.failure is None


def test_a_log_quieter_than_errors_still_shows_the_watch_a_failed_save(full_disk, tmp_path):
    """--verbosity=-3 (fatal only) dropped orbax's error record before any handler saw it: a job then
    waited for orbax's 20 minutes again. What the log shows stays as asked."""
    logger, handler = pylogging.getLogger("absl"), absl_logging.get_absl_handler()
    error = logger.makeRecord("absl", pylogging.ERROR, __file__, 1, "an error record", (), None)
    before, level_shown = logger.level, handler.level
    logger.setLevel(pylogging.CRITICAL)
    try:
        manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), max_to_keep=2)
        watch = FailedSaveWatch()
        assert error.levelno < handler.level  # the log shows fatal records only, as before
        _save(manager, 2)
        deadline = time.monotonic() + 60
        while watch.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        watch.close()
        assert isinstance(watch.failure, OSError) and watch.failure.errno == errno.ENOSPC
        assert logger.level == pylogging.CRITICAL and handler.level == level_shown  # all as it was
    finally:
        logger.setLevel(before)
