"""Checkpoint and stop when the scheduler sends SIGTERM (what preemptible TPU/GPU VMs, SLURM and
Kubernetes send before killing a job), so a preempted run loses no steps."""

from __future__ import annotations

import os
import signal
import threading
import time

import jax
import orbax.checkpoint as ocp
from absl import logging


class Preempted(Exception):
    """Raised after the preemption checkpoint is on disk; rerunning the command resumes from it."""

    # The entry point's exit status then: sysexits' EX_TEMPFAIL ("try again later"), so a scheduler
    # or wrapper script can requeue a preempted run and treat status 1 (an error) as final.
    EXIT_STATUS = 75


class PreemptionWatch:
    """One process: a SIGTERM handler sets a flag. Several processes: orbax's `reached_preemption`,
    which agrees on the stopping step across hosts through JAX's preemption sync manager."""

    def __init__(self, manager: ocp.CheckpointManager):
        self.manager = manager
        self.received = False
        self._first_at = 0.0
        self._previous = None
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    # A SIGTERM this soon after the first is the same preemption delivered twice (a scheduler that
    # signals the whole process group, and a launcher that passes it on to its processes).
    DUPLICATE_WITHIN_S = 1.0

    def _handle(self, signum: int, frame: object) -> None:
        del frame
        if self.received and time.monotonic() - self._first_at < self.DUPLICATE_WITHIN_S:
            return
        if self.received:
            # The step never ended (a stalled disk or bucket): a second SIGTERM stops now. Orbax renames a
            # checkpoint only once it is complete, so the last one on disk stays good.
            logging.warning("second SIGTERM: stopping now, without a checkpoint of this step")
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        logging.warning("SIGTERM received: saving a checkpoint after this step, then stopping "
                        "(a second SIGTERM stops at once)")
        self.received = True
        self._first_at = time.monotonic()

    def should_stop(self, step: int) -> bool:
        if jax.process_count() > 1:
            return self.manager.reached_preemption(step)
        return self.received

    def close(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
