"""Checkpoint and stop when the scheduler sends SIGTERM (what preemptible TPU/GPU VMs, SLURM and
Kubernetes send before killing a job), so a preempted run loses no steps; a Ctrl-C (SIGINT) of a
run in one process does the same. A run that must stop for a reason outside its state (a dead input
worker) saves what it finished the same way (`save_finished_steps`)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

from gmae_jax.train import checkpoint


class Preempted(BaseException):
    """Raised after the preemption checkpoint is on disk; rerunning the command resumes from it.

    A BaseException, as KeyboardInterrupt is: raised by a signal handler wherever the process is, it
    must pass every `except Exception` on its way out (logging, for one, swallows errors raised while
    it writes a line)."""

    # The entry point's exit status then: sysexits' EX_TEMPFAIL ("try again later"), so a scheduler
    # or wrapper script can requeue a preempted run and treat status 1 (an error) as final.
    EXIT_STATUS = 75
    # After a Ctrl-C: a shell's status for SIGINT, so that nothing requeues what a person stopped.
    INTERRUPTED_STATUS = 130

    def __init__(self, message: str, exit_status: int = EXIT_STATUS):
        super().__init__(message)
        self.exit_status = exit_status


_WHAT = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "Ctrl-C (SIGINT)"}


def stop_as_preempted_outside_training() -> None:
    """Before the training loop watches for SIGTERM (start-up, compiling, restoring) and after it, a
    SIGTERM stops the process as a preemption too (exit 75, one line), not by the signal (exit -15), so
    a job script requeues it. Nothing is saved then, and nothing unsaved is lost. Several processes:
    JAX's preemption service takes SIGTERM over once the job is joined."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _preempted_outside_training)
        quiet_lost_preemptions()


def quiet_lost_preemptions() -> None:
    """Python reports an exception it swallows (in a garbage-collection callback, e.g. JAX's, or a
    __del__) with a traceback on stderr. A lost `Preempted` is remembered (`_sigterm_outside_training`)
    and its one line is printed where the process stops, so its report is left out; every other
    exception goes to the hook that was there before."""
    previous = sys.unraisablehook
    if getattr(previous, "passes_on_all_but_preemptions", False):
        return

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, Preempted):
            previous(unraisable)

    hook.passes_on_all_but_preemptions = True
    sys.unraisablehook = hook


OUTSIDE_TRAINING = ("preempted (SIGTERM) outside training's steps: every checkpoint on disk stays; rerun the same "
                    "command")


# A handler's exception is lost where Python swallows exceptions (a garbage-collection callback, e.g.
# JAX's, or a __del__): a SIGTERM that arrived is also remembered, for the training loop to see.
_sigterm_outside_training = threading.Event()


def _preempted_outside_training(signum: int, frame: object) -> None:
    del signum, frame
    _sigterm_outside_training.set()
    raise Preempted(OUTSIDE_TRAINING)


class PreemptionWatch:
    """One process: a SIGTERM handler sets a flag. Several processes: orbax's `reached_preemption`,
    which agrees on the stopping step across hosts through JAX's preemption sync manager."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.received = False
        self.interrupted = False  # by Ctrl-C, not by a scheduler
        self.stepped = False  # a step of this run is done: from then on, a stop saves it first
        self._first_at = 0.0
        self._previous: dict[int, object] = {}
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in _WHAT}
            if _sigterm_outside_training.is_set():  # its exception was swallowed on the way (see above)
                self.close()
                raise Preempted(OUTSIDE_TRAINING)

    # A signal this soon after the first is the same stop delivered twice (a scheduler or a terminal
    # that signals the whole process group, and a launcher that passes it on to its processes).
    DUPLICATE_WITHIN_S = 1.0

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        # Before this run's first step is done (mostly its compile: minutes for a large model on a GPU,
        # past a scheduler's grace period) there is nothing to save: stop at once, as outside training.
        if not self.stepped:
            # Also a stop after the first step, should this exception be swallowed (see above).
            self.received, self.interrupted, self._first_at = True, signum == signal.SIGINT, time.monotonic()
            if signum == signal.SIGTERM:
                raise Preempted(OUTSIDE_TRAINING)
            raise Preempted("interrupted (Ctrl-C) before the first step was done: every checkpoint on disk stays; "
                            "rerun the same command", Preempted.INTERRUPTED_STATUS)
        if self.received and time.monotonic() - self._first_at < self.DUPLICATE_WITHIN_S:
            return
        if self.received:
            # The step never ended (a stalled disk or bucket): a second signal stops now. Orbax renames a
            # checkpoint only once it is complete, so the last one on disk stays good.
            logging.warning("second %s: stopping now, without a checkpoint of this step", _WHAT[signum])
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logging.warning("%s received: saving a checkpoint after this step, then stopping (a second one stops "
                        "at once)", _WHAT[signum])
        self.received = True
        self.interrupted = signum == signal.SIGINT
        self._first_at = time.monotonic()

    def stopped(self, saved_step: int | None, checkpoint_dir: str) -> Preempted:
        """What the trainer raises once the stopping step is saved."""
        resume = f"saved step {saved_step} in {checkpoint_dir}; rerun the same command to resume from it"
        if self.interrupted:
            return Preempted(f"interrupted: {resume}", Preempted.INTERRUPTED_STATUS)
        return Preempted(f"preempted: {resume}")

    def first_step_done(self) -> None:
        """From now on a stop saves this run's steps first."""
        self.stepped = True

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.received

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def save_finished_steps(manager: Any, done: int, state: Any, train_iter: Any, last_saved: int | None,
                        start: int) -> int | None:
    """Saves the steps done so far when the run must stop early for a reason outside the state (a dead
    input worker): the data iterator's state is a batch count, which a dead worker does not change, so
    a rerun continues exactly. One process only: a save is a collective that the job's other
    processes, which go on training, would never join. Returns the step now last saved, on disk."""
    if jax.process_count() > 1:
        return last_saved
    if done > start and done != last_saved:  # steps beyond those on disk
        checkpoint.save(manager, done, state, train_iter, None)
        last_saved = done
    manager.wait_until_finished()  # also an earlier save still in flight: the message names it as saved
    return last_saved


def resume_point(checkpoint_dir: str, last_saved: int | None) -> str:
    """Where a rerun of the same command starts."""
    if last_saved is None:
        return "No checkpoint was saved yet: rerunning the same command starts over"
    return f"Steps up to {last_saved} are saved in {checkpoint_dir}: rerunning the same command resumes there"
