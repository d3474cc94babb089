"""Entry point: `python -m gmae_jax.main --config=configs/<stage>.py --workdir=DIR [--config.x=y]`."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import traceback

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gmae_jax import compile_cache, distributed, host_memory, job_failures, quiet_logs, stages, user_errors
from gmae_jax.train import preemption, resume_check
from gmae_jax.train.preemption import Preempted

_CONFIG = config_flags.DEFINE_config_file("config", None, "Stage config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and pictures.")
flags.mark_flags_as_required(["config", "workdir"])
# An empty --workdir (an unset $WORKDIR in a script) would be the current folder.
flags.register_validator("workdir", lambda value: value is None or bool(value.strip()),
                         message="--workdir is empty; name the run's folder, e.g. --workdir=runs/pretrain")
# Multi-process JAX (see launch/README.md); without these flags one process uses all local devices.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "HOST:PORT of process 0; with --num_processes and --process_id.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job, e.g. one per node.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Rank of this process in [0, num_processes).")
_DISTRIBUTED_AUTO = flags.DEFINE_bool(
    "distributed_auto", False, "Read the job layout from the environment (Cloud TPU pods, SLURM).")
_DISTRIBUTED_TIMEOUT = flags.DEFINE_integer(
    "distributed_timeout", distributed.JOIN_TIMEOUT_S, "Seconds to wait for every process of the job to join.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show tracebacks for user errors too (or set GMAE_DEBUG=1).")
_NUM_CPU_DEVICES = flags.DEFINE_integer(
    "num_cpu_devices", None, "Split the CPU into this many devices (several CPU processes on one machine).")
_COMPILATION_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", None,
    "Where XLA keeps compiled programs, so that a resumed or repeated run skips its compiles (a local "
    f"folder or gs://...); default $JAX_COMPILATION_CACHE_DIR, else {compile_cache.DEFAULT_DIR}; "
    f"'{compile_cache.OFF}' turns it off.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    host_memory.keep_freed_memory()  # before JAX starts its threads (see gmae_jax/host_memory.py)
    logging.get_absl_handler().addFilter(quiet_logs.QuietLibraries())
    config = _CONFIG.value
    cache = compile_cache.enable(compile_cache.resolve(_COMPILATION_CACHE_DIR.value, os.environ))
    preemption.stop_as_preempted_outside_training()
    try:
        distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, auto=_DISTRIBUTED_AUTO.value,
                               num_cpu_devices=_NUM_CPU_DEVICES.value, timeout_s=_DISTRIBUTED_TIMEOUT.value)
        stages.validate(config)
        logging.info("JAX %s on %s; process %d of %d", jax.__version__, jax.devices()[0].platform,
                     jax.process_index(), jax.process_count())
        job_failures.on_failure_of_another(_stop_with)
        distributed.check_settings_agree(resume_check.flatten(config.to_dict()))
        stages.run(config, _WORKDIR.value)
        job_failures.finish_together()
        logging.info("%s", cache.summary())
    except Preempted as stop:
        _only_this_thread_exits()
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # a Ctrl-C outside training's loop (which saves and stops instead), or in a job
        if jax.distributed.is_initialized() and jax.process_count() > 1:
            job_failures.report_failure(INTERRUPTED)  # so that the others stop too, with this line
            _leave_the_job("interrupted\n", Preempted.INTERRUPTED_STATUS)  # not through JAX's shutdown barrier
        print("interrupted", file=sys.stderr, flush=True)
        sys.exit(Preempted.INTERRUPTED_STATUS)
    except Exception as error:
        # A mistake in the config, the data, the job flags or the workdir: one line that says what to
        # change. Bugs, and everything under --debug, keep their traceback.
        line = user_errors.one_line(error)
        debug = _DEBUG.value or user_errors.debug_requested(sys.argv)
        in_a_job = jax.distributed.is_initialized() and jax.process_count() > 1
        if in_a_job and line is None and not debug:
            others = job_failures.failures_of_others()
            if not others and waited_in_vain(error):  # a process gone without a word: process 0 says so soon
                others = job_failures.wait_for_failures_of_others(job_failures.SILENT_AFTER_S + _VERDICT_GRACE_S)
            if others:  # this process's error is their failure's echo (a collective that broke or timed out)
                _stop_with(others)
        if in_a_job and not waited_in_vain(error):
            job_failures.report_failure(line or first_line(error))
        if line is None or debug:
            if in_a_job:
                _leave_the_job(traceback.format_exc() + unanswered_hint(error))
            raise
        if in_a_job:
            _leave_the_job(f"error: {line}\n")
        sys.exit(f"error: {line}")


_VERDICT_GRACE_S = 10.0  # from a silent process's last word to the moment process 0 has reported it
# How a collective (or the key-value store behind it) ends when another process has failed, hangs, or
# has gone: timed out, or (Gloo, on CPU) its connection to the other process closed.
_WAITED_IN_VAIN = ("DEADLINE_EXCEEDED", "Connection closed by peer", "Connection reset by peer")


def waited_in_vain(error: BaseException) -> bool:
    """A collective that timed out or lost its peer: another process's failure, or a hang, shows up
    in this process as this."""
    return any(sign in str(error) for sign in _WAITED_IN_VAIN)


def first_line(error: BaseException) -> str:
    """`Type: message`, its first line, short: what the other processes of a job print of a bug."""
    text = f"{type(error).__name__}: {error}".strip().splitlines()[0]
    return text if len(text) <= 300 else text[:297] + "..."


def failed_first(others: dict[int, str]) -> str:
    """The line a process prints that stopped because others failed: theirs, named."""
    (process, line), *more = others.items()
    also = f" (and processes {sorted(p for p, _ in more)}; see their logs)" if more else ""
    return f"process {process} of this job failed, so process {jax.process_index()} stops too: {line}{also}"


INTERRUPTED = "interrupted (Ctrl-C)"  # what an interrupted process of a job leaves for the others


def stopped_by_others(others: dict[int, str]) -> tuple[str, int]:
    """The last line and exit status of a process that stops because others failed (theirs, named;
    status 1), or were all interrupted (status 130, as a Ctrl-C to the job's terminal reaches every
    process: one blocked in a collective may learn of it from another first)."""
    if all(line == INTERRUPTED for line in others.values()):
        who = (f"process {next(iter(others))} of this job was" if len(others) == 1
               else f"processes {', '.join(str(process) for process in others)} of this job were")
        return (f"interrupted: {who} interrupted (Ctrl-C), so process {jax.process_index()} stops too",
                Preempted.INTERRUPTED_STATUS)
    return f"error: {failed_first(others)}", 1


def _stop_with(others: dict[int, str]) -> None:
    line, status = stopped_by_others(others)
    _leave_the_job(line + "\n", status)


def unanswered_hint(error: BaseException) -> str:
    """A line under a collective's timeout in a multi-process job that no failure was reported to:
    another process may have died without a word (killed, out of memory), and its log may say why."""
    if not waited_in_vain(error):
        return ""
    return (f"note: process {jax.process_index()} waited in vain for another process of the job; if one failed "
            "first, its log names the error to fix (launch/local_multiprocess.sh: $LOG_DIR/process_<rank>.log)\n")


_LEAVING = threading.Lock()  # the main thread's error, or the watch for other processes' (one line, one exit)


def _only_this_thread_exits() -> None:
    """Returns in the first thread of this process to end it; any later one waits here for that exit."""
    if not _LEAVING.acquire(blocking=False):
        threading.Event().wait()


def _leave_the_job(message: str, status: int = 1) -> None:
    """Ends a process of a multi-process job that failed (or was interrupted), at once, with `status`.
    A normal exit runs JAX's exit hook, whose distributed shutdown waits up to 5 minutes for the other processes, which
    may wait in a collective for this one: the job would hang that long before the launcher (or the
    cluster) could see a process fail and stop the rest. Process 0 leaves last of those that fail
    with it (`job_failures.leave_in_order`). Errors that every process meets together
    (a NaN loss) have waited for their checkpoint already (`trainer.train`)."""
    _only_this_thread_exits()
    sys.stderr.write(message)
    sys.stderr.flush()
    sys.stdout.flush()
    logging.flush()
    for worker in multiprocessing.active_children():  # grain's input workers (which ignore SIGTERM): exiting
        worker.kill()  # so skips their hook
    for worker in multiprocessing.active_children():
        worker.join(timeout=5)
    job_failures.leave_in_order()
    os._exit(status)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with its errors as one line. It runs the config file and applies each
    `--config.x=y`, so a typo there (or an unknown preset) fails here, before `main`."""
    try:
        remaining = flags.FLAGS(argv)
        _ = _CONFIG.value.stage  # config_flags defers a config file that fails to load until first use
    except Exception as error:
        if user_errors.debug_requested(argv):
            raise
        sys.exit(f"error: {user_errors.flag_error_line(error, argv)}")
    renamed = user_errors.preset_override(argv)
    if renamed:
        sys.exit(f"error: {renamed}")
    return remaining


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
