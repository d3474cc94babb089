"""Entry point: `python -m gmae_jax.main --config=configs/<stage>.py --workdir=DIR [--config.x=y]`.

Stages (one config file each in configs/): demo (the embedded default: no download), prepare, pretrain,
finetune, evaluate, predict, export, import, study. Variants follow the file name
(`configs/pretrain.py:model=small,runlocal`); each file's docstring lists its own. Every field of a
config can be set with --config.<field>=<value>; the fields, their defaults and what they do are in
gmae_jax/schema.py, and README.md walks through each stage.
"""

from __future__ import annotations

import os
import signal
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gmae_jax import compile_cache, distributed, host_memory, job_failures, paths, quiet_logs, stages, user_errors
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
        stages.check_process_count(config, _NUM_PROCESSES.value or 1)  # before the processes join each other
        distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, auto=_DISTRIBUTED_AUTO.value,
                               num_cpu_devices=_NUM_CPU_DEVICES.value, timeout_s=_DISTRIBUTED_TIMEOUT.value)
        workdir = paths.checked(config, _WORKDIR.value)
        stages.validate(config)
        logging.info("JAX %s on %s; process %d of %d", jax.__version__, jax.devices()[0].platform,
                     jax.process_index(), jax.process_count())
        job_failures.on_failure_of_another(job_failures.stop_with)
        distributed.check_settings_agree(resume_check.flatten(config.to_dict()))
        stages.run(config, workdir)
        job_failures.finish_together()
        logging.info("%s", cache.summary())
    except Preempted as stop:
        job_failures.only_this_thread_exits()
        print(stop, file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)
    except KeyboardInterrupt:  # a Ctrl-C outside training's loop (which saves and stops instead), or in a job
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the same Ctrl-C again (a launcher passing it on) changes nothing
        line = ("interrupted (Ctrl-C): every checkpoint on disk stays; rerun the same command to resume from the "
                "last one")
        if job_failures.in_a_job():
            job_failures.report_failure(job_failures.INTERRUPTED)  # so that the others stop too, with this line
            job_failures.leave(line + "\n", Preempted.INTERRUPTED_STATUS)  # not through JAX's shutdown barrier
        print(line, file=sys.stderr, flush=True)
        sys.exit(Preempted.INTERRUPTED_STATUS)
    except Exception as error:
        # A mistake in the config, the data, the job flags or the workdir: one line that says what to
        # change. Bugs, and everything under --debug, keep their traceback.
        line = user_errors.one_line(error)
        debug = _DEBUG.value or user_errors.debug_requested(sys.argv)
        if job_failures.in_a_job():
            job_failures.leave_after(error, line, debug)
        if line is None or debug:
            raise
        sys.exit(f"error: {line}")


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
