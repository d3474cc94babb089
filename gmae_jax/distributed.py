"""Joins this process to a multi-process JAX job. It must run before anything touches devices:
JAX fixes the device list of a process the first time it is asked for it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


class DistributedSetupError(ValueError):
    """Flags that cannot start a multi-process job; the message says which flag to change."""


class ProcessesDisagreeError(ValueError):
    """The processes of one job see different data (e.g. out-of-sync copies on each host)."""


JOIN_TIMEOUT_S = 300  # jax.distributed.initialize's own default


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise DistributedSetupError(message)


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    num_cpu_devices: int | None = None,
    timeout_s: int = JOIN_TIMEOUT_S,
) -> None:
    """Starts multi-process JAX from explicit flags, from the environment (`auto`: Cloud TPU, SLURM),
    or not at all when nothing is given (one process sees all local devices).

    `num_cpu_devices` splits the host CPU into that many devices, which lets several processes on
    one machine stand in for several hosts. Joining waits up to `timeout_s` for every process; it
    says so first, since a process that never starts (or an unreachable coordinator) is otherwise
    silence, then JAX's abort.
    """
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [name for name, value in explicit.items() if value is not None]
    _check(not (auto and given),
           f"--distributed_auto reads the job layout from the environment; drop {', '.join(given)} "
           "or drop --distributed_auto")
    _check(not given or len(given) == len(explicit),
           f"{', '.join(given)} given without {', '.join(sorted(set(explicit) - set(given)))}: a "
           "multi-process job needs all three (or --distributed_auto on Cloud TPU and SLURM)")
    if given:
        host, _, port = coordinator_address.rpartition(":")
        _check(bool(host) and port.isdigit(),
               f"--coordinator_address={coordinator_address!r} must be HOST:PORT of process 0, "
               "e.g. 10.0.0.1:1234")
        _check(num_processes >= 1, f"--num_processes={num_processes} must be at least 1")
        _check(0 <= process_id < num_processes,
               f"--process_id={process_id} must be in [0, {num_processes}) for "
               f"--num_processes={num_processes}")
        if process_id == 0:
            _check_port_free(int(port), coordinator_address)
    _check(num_cpu_devices is None or num_cpu_devices >= 1,
           f"--num_cpu_devices={num_cpu_devices} must be at least 1")
    _check(timeout_s >= 1, f"--distributed_timeout={timeout_s} must be at least 1 (seconds)")

    if num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    if not (auto or given):
        return
    who = (f"process {process_id} of {num_processes}: joining the job through {coordinator_address}" if given
           else "joining the job the environment describes (Cloud TPU, SLURM)")
    logging.info("%s; waiting up to %d s (--distributed_timeout) for every process to join", who, timeout_s)
    # JAX ends a join that times out with a C++ abort whose text blames a task that died: this line first.
    deadline = threading.Timer(timeout_s, _never_joined, args=(who, timeout_s))
    deadline.daemon = True
    deadline.start()
    try:
        with _stopping_on_signals_while_joining():
            if auto:
                jax.distributed.initialize(initialization_timeout=timeout_s + _JAX_GRACE_S)
            else:
                jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                           process_id=process_id, initialization_timeout=timeout_s + _JAX_GRACE_S)
    finally:
        deadline.cancel()


_JAX_GRACE_S = 10  # JAX's own deadline, after ours


def _check_port_free(port: int, coordinator_address: str) -> None:
    """Process 0 listens on the coordinator's port, on every interface of its host. JAX's service binds
    it even where another job's coordinator listens already (gRPC shares ports), and that job then
    aborts as this one's processes join it; another program there ends JAX with a traceback."""
    for family, everywhere in ((socket.AF_INET6, "::"), (socket.AF_INET, "")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:  # no IPv6 on this host
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a past job's closing connections are fine
            try:
                probe.bind((everywhere, port))
            except OSError as error:
                if error.errno != errno.EADDRINUSE:
                    continue  # e.g. IPv6 without an address: the other family decides
                raise DistributedSetupError(
                    f"--coordinator_address={coordinator_address}: port {port} is in use on this host, where process "
                    "0 listens (another job's coordinator?); give the job a free port, and stop this job's other "
                    "processes meanwhile: joining that port, they would end the job that listens there") from None
            return


# How a process stopped while joining ends: as the entry point ends a preemption or a Ctrl-C outside
# training (`train.preemption.Preempted`), nothing saved and nothing lost.
_WHILE_JOINING = {signal.SIGTERM: ("preempted (SIGTERM)", 75), signal.SIGINT: ("interrupted (Ctrl-C)", 130)}


@contextlib.contextmanager
def _stopping_on_signals_while_joining() -> Iterator[None]:
    """Python runs its signal handlers in the main thread, which JAX's join holds in C++ until every
    process has joined or the timeout has passed: a SIGTERM (a scheduler's preemption) or Ctrl-C there
    took effect only then, and the process exited 1 with the join's error. Python's C-level handler
    still writes each signal's number to a wakeup file descriptor, which a thread watches."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end)

    def watch() -> None:
        while True:
            select.select([read_end], [], [])
            data = os.read(read_end, 64)
            if not data:  # the join has ended
                return
            for signum in data:
                if signum in _WHILE_JOINING:
                    what, status = _WHILE_JOINING[signum]
                    sys.stderr.write(f"{what} before the job was complete: nothing was saved or lost; rerun the "
                                     "same command\n")
                    sys.stderr.flush()
                    os._exit(status)

    watcher = threading.Thread(target=watch, name="signals-while-joining", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        signal.set_wakeup_fd(previous)
        os.close(write_end)
        watcher.join()
        os.close(read_end)


def _never_joined(who: str, timeout_s: int) -> None:
    sys.stderr.write(
        f"error: {who}: the job was not complete after {timeout_s} s (--distributed_timeout). Start every process "
        "of the job, each with its own --process_id and the same --num_processes and --coordinator_address "
        "(which must reach process 0); a process that stopped before joining says why in its log\n")
    sys.stderr.flush()
    os._exit(1)


# Settings that may differ between hosts: where each mounts the data, how many input workers its cores take.
PER_HOST_SETTINGS = ("data.root", "data.num_workers", "num_workers")
_SAME_DATA = "give every process the same data (the same files under config.data.root on every host)"


def check_settings_agree(settings: Mapping[str, Any]) -> None:
    """Stops every process of the job, naming the setting, when they were started with different
    configs (flags that differ between the hosts' command lines): a different batch size or learning
    rate trains a wrong model without a word, a different checkpoint_every waits forever in a save
    that the others never join. `settings`: the config's dotted field names and values. A collective:
    every process calls it."""
    compared = {f"config.{name}": value for name, value in settings.items() if name not in PER_HOST_SETTINGS}
    check_processes_agree(compared, "settings", remedy="give every process the same --config flags (only "
                          f"{', '.join(f'config.{name}' for name in PER_HOST_SETTINGS)} may differ between hosts)")


def check_processes_agree(facts: dict[str, Any], what: str, remedy: str = _SAME_DATA) -> None:
    """Stops every process of the job, with one line naming what differs, when they disagree on
    `facts` (image counts, class names, planned steps). Each process reads the data itself: hosts
    with out-of-sync copies would train on different data, or, when their step or batch counts
    differ, wait forever in a collective that the others never join. A collective: every process
    calls it."""
    if jax.process_count() == 1:
        return
    digests = [np.frombuffer(hashlib.sha256(_json(value).encode()).digest()[:8], np.int64)
               for value in facts.values()]
    gathered = np.asarray(multihost_utils.process_allgather(np.concatenate(digests)))  # (processes, facts)
    differing = [name for column, name in enumerate(facts) if (gathered[:, column] != gathered[0, column]).any()]
    if differing:
        mine = "; ".join(f"{name}: {_short(facts[name])}" for name in differing)
        others = sorted({int(p) for p in np.nonzero((gathered != gathered[jax.process_index()]).any(axis=1))[0]})
        raise ProcessesDisagreeError(
            f"the processes of this job see different {what}: {', '.join(differing)} not the same on every process "
            f"(process {jax.process_index()} has {mine}; processes {others} have other values); {remedy}")


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _short(value: Any) -> str:
    text = _json(value)
    return text if len(text) <= 80 else text[:77] + "..."
