"""The import stage: a PyTorch `.pth` (the original's checkpoint or our export) as a gmae_jax run
folder, `config.json` + `classes.json` + an orbax checkpoint of the weights, which `restore_run`,
the evaluate stage and a fine-tune's `init_from` read like any run (configs/import.py).

The file is read by `torch_mirror.weight_files` (`torch.load(weights_only=True)`: it cannot execute
code); a state dict that does not fit the model gets one line naming the first offending key and the
expected sizes.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from gmae_jax import config_checks, config_lib, run_files
from gmae_jax.data import views
from gmae_jax.models.presets import PRESETS, GMSTConfig, gmst_config
from gmae_jax.torch_mirror import convert, export_format, weight_files
from gmae_jax.train import checkpoint, resume_check, run_folder, setup

ONE_PROCESS = True  # one file in, one run folder out

STAGE = "import"  # `import` is a Python keyword, so the module is import_


def validate(config: ml_collections.ConfigDict) -> None:
    config_checks.check(bool(config.path), "config.path is empty; set --config.path=a .pth file (the original's "
                        "checkpoint or model.pth of an export)")
    config_checks.check(importlib.util.find_spec("torch") is not None,
                        "the import stage reads .pth files with PyTorch, which is not installed; "
                        "pip install -e '.[torch]'")
    try:
        config_checks.validate_model(config.model)
    except config_lib.ConfigError as error:
        raise config_lib.ConfigError(
            f"{error} (config.model is configs/import.py:model=PRESET's sizes, {DEFAULT_PRESET} by default, with "
            "each --config.model.* on top; it describes the original's checkpoints only: an export's file carries "
            "its own model)") from None
    # Before the file is read: a checkpoint may take minutes to load.
    _check_distinct(_given_class_names(config), "--config.class_names")


def _given_class_names(config: ml_collections.ConfigDict) -> list[str]:
    return [n.strip() for n in config.class_names.split(",") if n.strip()]


def _check_distinct(names: list[str], source: str) -> None:
    """Refuses repeated names: the run's classes.json would give two outputs one name."""
    repeated = run_folder.repeated_names(names)
    if repeated:
        raise config_lib.ConfigError(f"class names must differ; {', '.join(repeated)} is given more than once "
                                     f"({source})")


DEFAULT_PRESET = "reference"  # configs/import.py's: the original's own sizes
def _sizes(model: GMSTConfig) -> str:
    names = tuple(n for n in export_format.ORIGINAL_FIELDS if n != "in_channels") + ("mask_mode",)
    return ", ".join(f"{name}={getattr(model, name)}" for name in names)


def check_state_dict(shapes: dict[str, tuple[int, ...]], model: GMSTConfig, kind: str, num_classes: int | None,
                     path: str, asked_preset: str = "") -> None:
    """One line naming the first missing, extra or mis-shaped key, the sizes expected, and the preset
    whose sizes the file's tensors fit, if one does (`asked_preset`: the one configs/import.py was given)."""
    expected = convert.expected_state_dict_shapes(model, model=kind, num_classes=num_classes)
    problems = ([f"missing key '{k}'" for k in sorted(set(expected) - set(shapes))]
                + [f"extra key '{k}'" for k in sorted(set(shapes) - set(expected))]
                + [f"key '{k}' has shape {shapes[k]} where the model has {expected[k]}"
                   for k in sorted(set(shapes) & set(expected)) if shapes[k] != expected[k]])
    if problems and not set(shapes) & set(expected):  # no other size: another model altogether
        raise config_lib.ConfigError(
            f"config.path={path}: none of its {len(shapes)} tensors ({', '.join(sorted(shapes)[:3])}"
            f"{', ...' if len(shapes) > 3 else ''}) is one of G-MAE's (e.g. '{sorted(expected)[0]}'); give a "
            "checkpoint of the original G-MAE code or of a gmae_jax export")
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        # Each candidate's shapes cost a trace of its model (~1 s for `reference`): only presets of the file's
        # width (pos_embed's last dimension) are traced.
        width = (shapes.get("pos_embed") or (None,))[-1]
        fitting = [name for name, sizes in PRESETS.items()
                   if width in (None, sizes["embed_dim"]) and convert.expected_state_dict_shapes(
                       dataclasses.replace(gmst_config(config_lib.model_section(name)), mask_mode=model.mask_mode),
                       model=kind, num_classes=num_classes) == shapes]
        if fitting and asked_preset == fitting[0]:
            remedy = f"its tensors fit the {fitting[0]} preset as it is: drop the --config.model.* sizes given"
        elif fitting:
            remedy = f"its tensors fit the {fitting[0]} preset: configs/import.py:model={fitting[0]}"
        else:
            remedy = "set configs/import.py:model=PRESET and --config.model.* to the sizes the file was trained with"
        raise config_lib.ConfigError(f"config.path={path}: {problems[0]}{more} for a {kind} with {_sizes(model)}; "
                                     f"{remedy}")


def check_finite(state: dict[str, np.ndarray], path: str) -> None:
    """Weights with NaN or infinity (a run that diverged) would import into a model that predicts nothing."""
    broken = [name for name, value in state.items()
              if np.issubdtype(value.dtype, np.floating) and not np.all(np.isfinite(value))]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise config_lib.ConfigError(f"config.path={path}: tensor '{broken[0]}'{more} holds NaN or infinite values; "
                                     "import a checkpoint saved before the run diverged")


def imported_model(payload: dict[str, Any], config: ml_collections.ConfigDict, state: dict[str, np.ndarray]
                   ) -> GMSTConfig:
    """Our exports carry their model; an original file takes config.model, with the mask mode its
    keys imply: 'encoder' only with an encoder mask token (the original has none), else 'original',
    or 'sparse' where config.model asks for it (it has the original's tensors)."""
    if isinstance(payload.get("config"), dict) and "gmae_jax_model" in payload["config"]:
        try:
            exported = export_format.model_config(payload["config"])
        except ValueError as error:
            raise config_lib.ConfigError(f"config.path={config.path}: {error}; export the run again with this "
                                         "version of gmae_jax") from None
        _notice_model_not_applied(config.model, exported)
        return exported
    if "encoder_mask_token" in state:
        mask_mode = "encoder"
    else:
        mask_mode = "sparse" if config.model.mask_mode == "sparse" else "original"
    return dataclasses.replace(gmst_config(config.model), mask_mode=mask_mode)


def _notice_model_not_applied(asked: ml_collections.ConfigDict, exported: GMSTConfig) -> None:
    """Names what of config.model the command line chose (a preset other than configs/import.py's,
    `--config.model.*`) that our export's own model overrides, so that nobody believes it applied."""
    preset = config_lib.model_section(asked.preset)
    fields = [name for name in sorted(asked) if name != "preset"]
    given = [name for name in fields if asked[name] != preset[name]]
    ignored = [f"{name}={asked[name]!r} (the export's: {getattr(exported, name)!r})"
               for name in given if asked[name] != getattr(exported, name)]
    if asked.preset != DEFAULT_PRESET and any(preset[name] != getattr(exported, name) for name in fields):
        ignored.insert(0, f"preset {asked.preset}")
    if ignored:
        print(f"notice: the export carries its model, so config.model is not applied: {'; '.join(ignored)}. "
              "Set such fields on the stage that uses the imported run.", flush=True)


def _class_names(payload: dict[str, Any], config: ml_collections.ConfigDict, num_classes: int | None,
                 path: str) -> list[str]:
    given = _given_class_names(config)
    if num_classes is None and given:
        raise config_lib.ConfigError(f"config.path={path} is a pretraining model (no classifier head): it has no "
                                     "classes; drop --config.class_names")
    carried = list(payload.get("class_names") or [])
    if carried and num_classes is not None and len(carried) != num_classes:
        raise config_lib.ConfigError(f"config.path={path} carries {len(carried)} class names for a head of "
                                     f"{num_classes} outputs: a damaged or edited export; export the run again")
    if carried and given and given != carried:
        raise config_lib.ConfigError(f"config.path={path} carries its class names ({','.join(carried)}); drop "
                                     "--config.class_names, which would contradict them")
    names = carried or given
    _check_distinct(names, f"in config.path={path}" if carried else "--config.class_names")
    if num_classes is not None and len(names) != num_classes:
        raise config_lib.ConfigError(
            f"config.path={path} is a classifier of {num_classes} classes but {len(names)} class names are known; "
            f"set --config.class_names to its {num_classes} classes in output order, comma-separated")
    return names


def _pretraining(payload: dict[str, Any]) -> dict[str, Any] | None:
    """An export's pretraining settings; exports from before they were written carry the mask ratio
    only (the norm_pix_loss default, False, is the original's)."""
    exported = payload.get("config")
    if not isinstance(exported, dict):
        return None
    if exported.get("pretraining"):
        return exported["pretraining"]
    mask_ratio = (exported.get("model") or {}).get("mask_ratio")
    return None if mask_ratio is None else {"mask_ratio": mask_ratio, "norm_pix_loss": False}


def _step(payload: dict[str, Any], state: dict[str, np.ndarray], path: str) -> int:
    """Our export's step; for the original's files, the BatchNorm forward count (its best guess)."""
    step = payload.get("step")
    if isinstance(step, int) and not isinstance(step, bool):
        if not 0 <= step < config_checks.MAX_STEPS:
            raise config_lib.ConfigError(f"config.path={path} records step {step}, which no run reaches (a step is "
                                         "in [0, 2**31)): a damaged or edited export; export the run again")
        return step
    counts = [int(v) for k, v in sorted(state.items()) if k.endswith(".num_batches_tracked")]
    return counts[0] if counts else 0


def _view(payload: dict[str, Any], path: str) -> str | None:
    """The evaluation view our export recorded (None for the original's files and older exports); one
    that is none of ours (an edited or damaged export, or a newer version's) is named rather than dropped."""
    config = payload.get("config")
    preprocessing = config.get("preprocessing") if isinstance(config, dict) else None
    view = preprocessing.get("view") if isinstance(preprocessing, dict) else None
    if view is not None and view not in views.VIEWS:
        raise config_lib.ConfigError(f"config.path={path}: its preprocessing names the view {view!r}, none of "
                                     f"{views.VIEWS}: an export edited, damaged or from a newer gmae_jax; export "
                                     "the run again with this version")
    return view


def run_config(config: ml_collections.ConfigDict, stage: str, model: GMSTConfig, num_classes: int | None,
               pretraining: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The training config the imported run is written as: the stage's own config with this model
    (and, for a pretraining model, the loss settings `pretraining` its export carries)."""
    written = ml_collections.ConfigDict(config[stage].to_dict())
    if stage == "pretrain" and pretraining:
        written.mask_ratio = float(pretraining["mask_ratio"])
        written.norm_pix_loss = bool(pretraining["norm_pix_loss"])
    # The sizes are the file's (an export's own, or config.model's checked against the file).
    written.model = ml_collections.ConfigDict({"preset": setup.IMPORTED_PRESET, **dataclasses.asdict(model)})
    written.best_metric = ""  # no evaluation ranked this checkpoint: only 'latest' exists
    written.data.root = ""  # it saw no data here: evaluating it asks for --config.data_root
    if num_classes is not None:
        written.num_classes = num_classes
    return written


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Writes the run folder into `workdir`; returns what was imported."""
    checkpoints = epath.Path(workdir) / run_folder.CHECKPOINTS
    run_files.check_kinds(workdir, (run_folder.CONFIG_FILE, run_folder.CLASSES_FILE, run_folder.FACTS_FILE),
                          (run_folder.CHECKPOINTS,), keeper="the import writes")
    holds_config = (epath.Path(workdir) / run_folder.CONFIG_FILE).exists()
    if holds_config and not run_folder.checkpoint_steps(workdir):
        # An import killed outright (no cleanup runs) writes the run files, then dies saving the checkpoint.
        raise config_lib.ConfigError(f"--workdir={workdir} holds a run's files but no saved checkpoint, as an import "
                                     "(or a run) killed before its first save leaves them: there are no weights in "
                                     "it; remove the folder and import again, or import into a new folder")
    if holds_config or (checkpoints.is_dir() and any(checkpoints.iterdir())):
        raise config_lib.ConfigError(f"--workdir={workdir} already holds a run (or its checkpoints); import into "
                                     "a new folder")
    run_folder.check_not_inside_a_run(workdir, "import")  # where it would pass for that run
    payload = weight_files.read_pth(config.path)
    view = _view(payload, config.path)  # how the exported run saw its evaluation images: predict and evaluate follow it
    state = {**payload["model_state_dict"], **payload.get("extra_state_dict", {})}
    kind = "classifier" if any(k.startswith("classifier.") for k in state) else "pretrain"
    stage = "finetune" if kind == "classifier" else "pretrain"
    num_classes = int(state["classifier.1.weight"].shape[0]) if "classifier.1.weight" in state else None
    if kind == "classifier" and num_classes is None:
        raise config_lib.ConfigError(f"config.path={config.path}: missing key 'classifier.1.weight' (the head's "
                                     "weights, one row a class) where other classifier.* keys are there")
    model = imported_model(payload, config, state)
    check_state_dict({k: tuple(v.shape) for k, v in state.items()}, model, kind, num_classes, config.path,
                     config.model.get("preset", ""))
    check_finite(state, config.path)
    class_names = _class_names(payload, config, num_classes, config.path)
    variables = convert.torch_to_flax_variables(state, model=kind, config=model)
    step = _step(payload, state, config.path)
    written = run_config(config, stage, model, num_classes, _pretraining(payload))

    weights = setup.Weights(step=jnp.asarray(step, jnp.int32), params=jax.tree.map(jnp.asarray, variables["params"]),
                            batch_stats=jax.tree.map(jnp.asarray, variables["batch_stats"]))
    if view == "hand_crop":
        written.data.mode = "hand_crop"
    resume_check.write_run_files(written, workdir, class_names, facts={resume_check.VIEW: view} if view else None)
    try:
        manager = checkpoint.make_manager(str(checkpoints), max_to_keep=1)
        if not checkpoint.save(manager, step, weights, data_iterator=None):
            raise RuntimeError(f"orbax declined to save step {step} in {manager.directory}")
        manager.wait_until_finished()
        manager.close()
    except BaseException:
        # Without its checkpoint the folder is no run: a rerun of the same command must not find one.
        for name in (run_folder.CONFIG_FILE, run_folder.CLASSES_FILE, run_folder.FACTS_FILE):
            (epath.Path(workdir) / name).unlink(missing_ok=True)
        raise
    logging.info("[import] %s (%s, %d tensors) -> %s, step %d", config.path, stage, len(state), workdir, step)
    print(f"imported {config.path} as a {stage} run in {workdir} (step {step}); use it as "
          f"--config.checkpoint_dir={workdir} or --config.init_from={workdir}", flush=True)
    return {"stage": stage, "step": step, "num_tensors": len(state)}
