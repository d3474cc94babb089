"""XLA's persistent compilation cache for every stage the entry point runs.

A resumed, repeated or evaluated run reads the programs an earlier run compiled instead of compiling
them again: minutes for the `reference` model on an accelerator, every time a preemptible job comes
back. The cache lives outside the run folders (a run's files never depend on it), keyed by JAX on
the program, the devices and the XLA flags, so a stale entry is never used for another program.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping

import jax
from absl import logging

from gmae_jax import paths

DEFAULT_DIR = "~/.cache/gmae_jax/xla"
OFF = "none"
_HITS = "/jax/compilation_cache/cache_hits"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"


def resolve(flag_value: str | None, environ: Mapping[str, str]) -> str | None:
    """The cache folder: the flag's, else $JAX_COMPILATION_CACHE_DIR, else DEFAULT_DIR; None when
    the flag (or the variable) says 'none' or is empty. Local paths get '~' expanded."""
    value = flag_value if flag_value is not None else environ.get("JAX_COMPILATION_CACHE_DIR", DEFAULT_DIR)
    if not value.strip() or value.strip().lower() == OFF:
        return None
    return value if "://" in value else os.path.expanduser(value)


@dataclasses.dataclass
class CacheUse:
    """What the cache did for this process, counted from JAX's monitoring events."""

    directory: str | None
    programs_read: int = 0
    seconds_saved: float = 0.0

    def summary(self) -> str:
        if self.directory is None:
            return "XLA compilation cache off"
        return (f"XLA compilation cache {self.directory}: {self.programs_read} compiled program(s) read "
                f"(~{self.seconds_saved:.0f} s of compiling saved)")


def writable(directory: str) -> str | None:
    """None if `directory` (local) can be created and written, else why not. Buckets are not
    checked here: JAX warns and compiles as usual if a write there fails."""
    why = paths.problem(directory)
    if why or "://" in directory:
        return why
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory):
            pass
    except OSError as error:
        return f"{type(error).__name__}: {error.strerror or error}"
    return None


def enable(directory: str | None) -> CacheUse:
    """Points JAX's persistent cache at `directory` (None: off) before anything compiles, and
    counts the programs read from it. A folder that cannot be written turns the cache off with one
    warning (a run never fails for want of a cache). JAX's own threshold stays: programs that
    compile in under a second ($JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS) are not written."""
    problem = writable(directory) if directory is not None else None
    if problem:
        logging.warning("XLA compilation cache off: cannot write %s (%s); choose another folder with "
                        "--compilation_cache_dir=DIR, or --compilation_cache_dir=none", directory, problem)
        directory = None
    jax.config.update("jax_compilation_cache_dir", directory)
    use = CacheUse(directory)
    if directory is None:
        return use

    def on_event(event: str, **_: object) -> None:
        if event == _HITS:
            use.programs_read += 1

    def on_duration(event: str, seconds: float, **_: object) -> None:
        if event == _SAVED:
            use.seconds_saved += max(seconds, 0.0)

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_duration)
    return use
