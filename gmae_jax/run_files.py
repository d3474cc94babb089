"""Writing a run folder's small text files (config.json, metrics.jsonl, ...) so that a kill never
leaves one empty or cut off: the text goes to a temporary file beside it, which then replaces it.
They are rewritten whole rather than appended to because object stores (gs://) cannot append."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO

from etils import epath

from gmae_jax.schema import ConfigError


def write_whole(path: epath.Path | str, write: Callable[[BinaryIO], None]) -> None:
    """`write(file)` into `path`, except that readers (and a rerun after a kill) see the old file or the
    new one, never a partial one: it goes to a temporary file beside it, which then replaces it. The
    temporary name is random: writers never share one (process ids repeat across hosts and containers)."""
    path = epath.Path(path)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:16]}.tmp")
    try:
        with temporary.open("wb") as f:
            write(f)
        temporary.replace(path)
    except BaseException as error:
        if temporary.exists():
            temporary.unlink()
        if isinstance(error, OSError):  # e.g. a full disk: the file it was for is the one to name
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{16}\.tmp$")  # write_whole's temporary names


def remove_leftovers(folder: epath.Path | str) -> list[str]:
    """Deletes the temporary files that writes cut short by a kill left in `folder` (the files they were
    for are whole: the old or the new one). Only for the folder's one writer (a run holds its lock)."""
    removed = []
    for path in epath.Path(folder).glob(".*.tmp"):
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def write_text(path: epath.Path | str, text: str) -> None:
    """`path.write_text(text)`, written whole (`write_whole`)."""
    write_whole(path, lambda f: f.write(text.encode()))


def read_json(path: epath.Path | str) -> Any:
    """The JSON in one of a run's files; a damaged one (emptied or cut off by a kill before these
    writes were atomic, or edited by hand) is a one-line error naming it, not a JSONDecodeError."""
    path = epath.Path(path)
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        state = "is empty" if not text.strip() else f"is not valid JSON ({error})"
        raise ConfigError(f"{path} {state}: restore it from a copy, or move the run folder aside and start "
                          "a new run") from None


def check_kinds(workdir: str, files: Sequence[str], folders: Sequence[str] = (), keeper: str = "the run keeps") -> None:
    """One line naming a file of `files` that is a folder in `workdir`, or one of `folders` that is a file,
    before anything runs: one of the other kind would fail only where it is first written, maybe hours in
    (a checkpoint save into a file even hangs orbax's background thread). `keeper`: who writes them."""
    for name in (*files, *folders):
        path = epath.Path(workdir) / name
        folder = name in folders
        if path.exists() and path.is_dir() != folder:
            raise ConfigError(f"{path} is {'no folder' if folder else 'a folder'}, where {keeper} a "
                              f"{'folder' if folder else 'file'} of that name; move it away (or use another --workdir)")
