"""Paths as users type them: local folders (with `~`) and gs:// buckets, checked before a stage starts.

A shell expands `~` only at the start of a word, so `--workdir=~/runs/x` reaches the program as is and
would make a folder literally named `~` in the current one. A scheme gmae_jax does not read (`gcs://`,
`s3://`) or a bucket with one slash (`gs:/b`, a local folder `gs:`) would otherwise surface as a
traceback from deep inside a library, in the worst case after training.
"""

from __future__ import annotations

import os
import re

import ml_collections

from gmae_jax.schema import ConfigError

SCHEMES = ("gs",)  # through etils epath and gcsfs (the `gcs` extra)
_SCHEME_LIKE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/")


def expand_home(path: str) -> str:
    """`~` and `~user` at the start of a local path, as the shell would have expanded them."""
    return os.path.expanduser(path) if path.startswith("~") else path


def problem(path: str) -> str | None:
    """Why `path` is neither a local path nor a bucket gmae_jax reads and writes; None if it is one."""
    match = _SCHEME_LIKE.match(path)
    if not match:
        return None
    scheme = match.group(1)
    if scheme in SCHEMES:
        if path.startswith(f"{scheme}://"):
            return None
        return f"'{path}' is not a bucket path: write {scheme}://BUCKET/PATH (two slashes)"
    return (f"'{path}': {scheme}:// is not storage gmae_jax reads or writes; use a local path or "
            f"{SCHEMES[0]}://BUCKET/PATH")


def checked(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Expands `~` in `workdir` and in every text field of `config` (in place) and raises ConfigError
    for a path `problem` names. Returns the workdir to use."""
    workdir = expand_home(workdir)
    if why := problem(workdir):
        raise ConfigError(f"--workdir={why}")
    for name, value in _text_fields(config):
        expanded = expand_home(value)
        if why := problem(expanded):
            raise ConfigError(f"config.{name}={why}")
        if expanded != value:
            _set(config, name, expanded)
    return workdir


def _text_fields(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, str]]:
    fields = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            fields += _text_fields(value, f"{prefix}{key}.")
        elif isinstance(value, str):
            fields.append((f"{prefix}{key}", value))
    return fields


def _set(config: ml_collections.ConfigDict, name: str, value: str) -> None:
    *sections, field = name.split(".")
    for section in sections:
        config = config[section]
    config[field] = value
