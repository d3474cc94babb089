"""Joins this process to a multi-process JAX job. It must run before anything touches devices:
JAX fixes the device list of a process the first time it is asked for it."""

from __future__ import annotations

import jax


class DistributedSetupError(ValueError):
    """Flags that cannot start a multi-process job; the message says which flag to change."""


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
) -> None:
    """Starts multi-process JAX from explicit flags, from the environment (`auto`: Cloud TPU, SLURM),
    or not at all when nothing is given (one process sees all local devices).

    `num_cpu_devices` splits the host CPU into that many devices, which lets several processes on
    one machine stand in for several hosts.
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
    _check(num_cpu_devices is None or num_cpu_devices >= 1,
           f"--num_cpu_devices={num_cpu_devices} must be at least 1")

    if num_cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", num_cpu_devices)
    if auto:
        jax.distributed.initialize()
    elif given:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
