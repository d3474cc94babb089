"""The mistakes a user can make (a config value, a typo in a flag, a data folder, a full disk or a
folder without write permission) as the one line the entry point prints instead of a traceback.
Anything else is a bug and keeps its traceback; `--debug` or GMAE_DEBUG=1 keeps it for all."""

from __future__ import annotations

import difflib
import errno
import os
import re
from collections.abc import Iterator, Sequence

import jax
import ml_collections

from gmae_jax import config_lib, distributed
from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.data.input_workers import InputWorkerDiedError
from gmae_jax.data.pipeline import BadImageBudgetError
from gmae_jax.data.worker_pool import WorkerDiedError
from gmae_jax.schema import ConfigError
from gmae_jax.train.divergence import TrainingDivergedError

# Errors whose message is already the one line a user needs.
USER_ERRORS: tuple[type[Exception], ...] = (
    ConfigError, DataLayoutError, distributed.DistributedSetupError, distributed.ProcessesDisagreeError,
    BadImageBudgetError, InputWorkerDiedError, WorkerDiedError, TrainingDivergedError)
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = "No space left on device"


def debug_requested(argv: Sequence[str]) -> bool:
    """`--debug` on the command line or GMAE_DEBUG=1: show tracebacks (read before flags parse)."""
    return "--debug" in argv or "--debug=true" in argv or os.environ.get("GMAE_DEBUG", "") not in ("", "0")


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and the errors it was raised from or while handling (libraries wrap ours)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def os_error_line(error: OSError) -> str:
    """Which path, what went wrong, what to do."""
    where = error.filename or "the workdir"
    if error.errno in _FULL:
        return (f"no space left on the device writing {where}; free space there (or use a --workdir on another "
                "disk) and rerun the same command (a training run resumes from its last complete checkpoint)")
    return (f"cannot access {where} ({error.strerror}); fix its permissions for this user, or choose another "
            "folder (--workdir, --config.data.root)")


def is_out_of_memory(error: BaseException) -> bool:
    """XLA's status for a program that does not fit the device (at compile or run time, any backend);
    not the other RESOURCE_EXHAUSTED statuses (e.g. a coordination message over gRPC's size limit)."""
    text = str(error).lower()
    return "out of memory" in text or ("resource_exhausted" in text and "memory" in text)


def out_of_memory_line(error: BaseException) -> str:
    """What did not fit (XLA's first line), and the settings that make a step fit, cheapest first."""
    said = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    said = said if len(said) <= 240 else said[:237] + "..."
    return (f"the device ran out of memory ({said}). To fit the step: --config.model.remat=block (recompute "
            "each block's activations in the backward pass), --config.model.dtype=bfloat16, "
            "--config.grad_accum_steps=K (the batch in K passes), --config.mesh.fsdp=N (parameters and "
            "optimiser state split over N devices), or a smaller --config.batch_size or --config.model.img_size; "
            "`python -m gmae_jax.bench --suite=memory` plans a setting's memory without the device")


def _from_text(text: str) -> str | None:
    """The message of a user error quoted in a formatted traceback (config_flags re-raises the
    config file's error with its traceback as the message; grain workers send theirs as text)."""
    for cls in USER_ERRORS:
        match = re.search(rf"\b{cls.__name__}: (.+)", text)
        if match:
            return match.group(1).strip()
    return None


def one_line(error: BaseException) -> str | None:
    """The message for an error a user caused (also when a library wrapped it or a worker process
    sent it back as text), or None for anything else."""
    for item in _chain(error):
        if isinstance(item, USER_ERRORS):
            return _from_text(str(item)) or str(item).strip().splitlines()[0]
        if isinstance(item, OSError) and item.errno in _NOT_WRITABLE + _FULL:
            return os_error_line(item)
        if isinstance(item, jax.errors.JaxRuntimeError) and is_out_of_memory(item):
            return out_of_memory_line(item)
    text = "\n".join(str(item) for item in _chain(error))
    found = _from_text(text)
    if found:
        return found
    if _FULL_TEXT in text:  # tensorstore (orbax's writer) reports a full disk in its own words
        return os_error_line(OSError(errno.ENOSPC, _FULL_TEXT))
    return None


def _config_flag(argv: Sequence[str]) -> tuple[str, str] | None:
    """(FILE, ARG) of `--config=FILE[:ARG]` on the command line, or None."""
    for item in argv:
        if item.startswith("--config="):
            path, _, arg = item[len("--config="):].partition(":")
            return path, arg
    return None


def _config_from_argv(argv: Sequence[str]) -> ml_collections.ConfigDict | None:
    """The config `--config=FILE[:ARG]` builds, or None when that fails too."""
    flag = _config_flag(argv)
    if flag is None:
        return None
    path, arg = flag
    try:
        name = os.path.splitext(os.path.basename(path))[0]
        return config_lib.load_sibling_config(path, name, arg or None)
    except Exception:  # noqa: BLE001 - the flag error itself is then the best we can say
        return None


def _field_paths(node: ml_collections.ConfigDict, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field's path under `node`, sections included."""
    paths = []
    for key in node.keys():
        paths.append((*prefix, key))
        if isinstance(node[key], ml_collections.ConfigDict):
            paths += _field_paths(node[key], (*prefix, key))
    return paths


def _closest_fields(config: ml_collections.ConfigDict, parts: list[str], i: int,
                    known: list[str]) -> list[tuple[str, ...]]:
    """Paths to suggest for `parts` where `parts[i]` names no field: that name in another section first
    (`--config.patch_size`: model.patch_size; a near sibling would be batch_size, another setting), then a
    near sibling, then a near name anywhere."""
    rest = tuple(parts[i + 1:])
    everywhere = _field_paths(config)

    def fields_named(name: str) -> list[tuple[str, ...]]:  # the two shallowest
        return [path + rest for path in sorted((p for p in everywhere if p[-1] == name), key=len)[:2]]

    if same_name := fields_named(parts[i]):
        return same_name
    if close := difflib.get_close_matches(parts[i], known, n=1):
        return [(*parts[:i], close[0], *rest)]
    names = sorted({path[-1] for path in everywhere})
    return [path for name in difflib.get_close_matches(parts[i], names, n=1) for path in fields_named(name)]


# The configs of single stages (the demo's and the study's nest theirs under sections).
STAGE_CONFIGS = ("pretrain", "finetune", "evaluate", "predict", "prepare", "export", "import")


def _stages_with_field(config_file: str, path: str) -> list[str]:
    """The stages' configs beside `config_file` that have the field `path`: a pretraining setting
    given to a fine-tune (`--config.mask_ratio`) is that, not a typo of a near name."""
    folder, own = os.path.dirname(config_file), os.path.splitext(os.path.basename(config_file))[0]
    wanted = tuple(path.split("."))
    return [name for name in STAGE_CONFIGS
            if name != own and os.path.isfile(os.path.join(folder, f"{name}.py"))
            and wanted in _field_paths(config_lib.load_sibling_config(config_file, name))]


def unknown_field(argv: Sequence[str]) -> str | None:
    """For the first `--config.a.b=v` that names no field: which part, and the closest field (or the
    training stage whose setting it is)."""
    config = _config_from_argv(argv)
    if config is None:
        return None
    for item in argv:
        if not item.startswith("--config."):
            continue
        path = item[len("--config."):].partition("=")[0]
        node, walked = config, "config"
        parts = path.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                named_here = any(p[-1] == part for p in _field_paths(config))  # then only misplaced here
                config_file = _config_flag(argv)[0]
                if not named_here and (stages := _stages_with_field(config_file, path)):
                    own = os.path.splitext(os.path.basename(config_file))[0]
                    return (f"--config.{path}: {walked} has no field '{part}'; it is a setting of "
                            f"{' and '.join(f'configs/{name}.py' for name in stages)}, not of configs/{own}.py")
                closest = _closest_fields(config, parts, i, known)
                hint = ("did you mean " + " or ".join("--config." + ".".join(p) for p in closest) + "?" if closest
                        else f"fields: {known}")
                return f"--config.{path}: {walked} has no field '{part}'; {hint}"
            node, walked = node[part], f"{walked}.{part}"
    return None


def preset_override(argv: Sequence[str]) -> str | None:
    """A `--config...model.preset=X` only renames the model: its sizes are the config file's `:model=`
    variant's (config_lib.model_section), so the run would train one model under another's name."""
    for item in argv:
        path, _, preset = item[len("--config."):].partition("=") if item.startswith("--config.") else ("", "", "")
        if path == "model.preset" or path.endswith(".model.preset"):
            file = (_config_flag(argv) or ("configs/<stage>.py", ""))[0]
            return (f"--config.{path}={preset} would only rename the model: its sizes come with the config file's "
                    f"variant; use --config={file}:model={preset or '<preset>'} (and --config.model.<field> to "
                    "change one size)")
    return None


def section_given_a_value(path: str, value: str) -> str:
    """`--config.model=small`: a section of fields takes no value of its own."""
    line = (f"--config.{path}={value}: config.{path} is a section of fields, not a value; set one of its fields "
            f"(--config.{path}.<field>=...)")
    if path == "model":
        line += f", or choose a model preset with the config's variant: --config=configs/<stage>.py:model={value}"
    return line


def flag_error_line(error: BaseException, argv: Sequence[str]) -> str:
    """One line for an error raised while parsing the command line (the config file runs then)."""
    line = one_line(error)  # config_flags hands the config file's own error back as traceback text
    if line is not None:
        return line
    field = unknown_field(argv)
    if field is not None:
        return field
    text = "\n".join(str(item) for item in _chain(error))
    missing = re.search(r"\[Errno \d+\] .+", text)  # a config file that does not load
    if missing:
        return f"cannot load the config file: {missing.group(0)}"
    section = re.search(r"flag --config\.([\w.]+)=(.*?): Failed to parse .* as a ConfigDict", text)
    if section:
        return section_given_a_value(*section.groups())
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = lines[0] if lines else type(error).__name__
    flag = _config_flag(argv)
    # A config file that loads but is no stage config (no get_config, or one that returns no ConfigDict).
    no_config = any(isinstance(item, AttributeError) for item in _chain(error))
    return f"{first} (while reading --config={flag[0]})" if no_config and flag else first
