"""Build the model of a config, and rebuild a finished (or running) run from its workdir (whose files
`run_folder` knows).

`restore_run(workdir)` is what every stage that uses trained weights starts from (evaluate,
predict, export, a fine-tune's `init_from`): it reads the run's `config.json` and `classes.json`,
rebuilds the model and the mesh, and restores only the step, parameters and BatchNorm statistics of
a checkpoint, directly with their shardings. It never builds an optimiser and never opens data.
A damaged newest checkpoint is skipped for the previous one (as a resumed training run does), but
left where it is: these stages only read the run.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from gmae_jax.models import fast_conv
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.presets import gmst_config
from gmae_jax.schema import ConfigError, LoopConfig, MeshConfig, read, read_flat
from gmae_jax.train import checkpoint, run_folder, sharding

IMPORTED_PRESET = run_folder.IMPORTED_PRESET  # config.model.preset of a run the import stage wrote


def build_model(config: ml_collections.ConfigDict) -> tuple[nn.Module, tuple[jax.Array, ...]]:
    """The model of a pretrain or finetune config, and example positional inputs for `init`;
    `conv_impl='auto'` resolved for this backend and the config's gradient accumulation."""
    gmst = gmst_config(config.model)
    accumulating = read_flat(LoopConfig, config).grad_accum_steps > 1
    gmst = dataclasses.replace(gmst, conv_impl=fast_conv.resolve(gmst.conv_impl, jax.default_backend(), accumulating))
    image = jnp.zeros((1, gmst.img_size, gmst.img_size, gmst.in_channels), jnp.float32)
    if config.stage == "pretrain":
        return GMAE(gmst), (image, jnp.zeros((1, gmst.num_patches), bool))
    return GMAEClassifier(gmst, config.num_classes), (image,)


def init_variables(model: nn.Module, init_inputs: tuple[jax.Array, ...], rng: jax.Array) -> tuple[Any, Any]:
    """A model's parameters and BatchNorm statistics as every run starts them: one key for parameters
    and dropout, in inference mode (`init_inputs`: `build_model`'s)."""
    variables = model.init({"params": rng, "dropout": rng}, *init_inputs, train=False)
    return variables["params"], variables.get("batch_stats", {})


@flax.struct.dataclass
class Weights:
    """What inference needs of a train state. Its fields are named as TrainState's, so the eval
    steps (which read `.params` and `.batch_stats`) take either."""

    step: jax.Array
    params: Any
    batch_stats: Any


@dataclasses.dataclass(frozen=True)
class RestoredRun:
    """A run rebuilt from its workdir: its config, classes, model, mesh and restored weights."""

    workdir: str
    config: ml_collections.ConfigDict
    class_names: list[str]
    model: nn.Module
    mesh: jax.sharding.Mesh
    weights: Weights
    step: int  # the restored checkpoint's training step
    # Newer steps that did not restore (damaged on disk), with the reason, when `which` was 'latest'.
    skipped: tuple[tuple[int, str], ...] = ()

    def skipped_notice(self) -> str:
        """One line for the stage's output saying which damaged steps were passed over; '' if none."""
        if not self.skipped:
            return ""
        steps = [step for step, _ in self.skipped]
        return (f"notice: used checkpoint step {self.step} of {self.workdir}/{run_folder.CHECKPOINTS}: the newer "
                f"step(s) {steps} could not be restored ({checkpoint.describe(list(self.skipped))})")


def validate_run_reference(config: ml_collections.ConfigDict, runs: str = "a pretrain or finetune run") -> None:
    """The checks of a stage that reads a run (`config.checkpoint_dir`, `config.checkpoint`)."""
    if not config.checkpoint_dir:
        raise ConfigError(f"config.checkpoint_dir is empty; set --config.checkpoint_dir=WORKDIR of {runs}")
    if not (config.checkpoint in (checkpoint.LATEST, checkpoint.BEST) or str(config.checkpoint).isdigit()):
        raise ConfigError(f"config.checkpoint='{config.checkpoint}' must be 'latest', 'best' or a step number")


def checkpoint_manager(workdir: str, config: ml_collections.ConfigDict) -> ocp.CheckpointManager:
    """A read-only manager of the run's checkpoints that knows the run's best metric."""
    loop = read_flat(LoopConfig, config)
    return checkpoint.make_manager(str(epath.Path(workdir) / run_folder.CHECKPOINTS), loop.keep_checkpoints,
                                   loop.best_metric, loop.best_mode, read_only=True)


def run_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's own `config.mesh` where it fits this job's devices, else all devices on `data`
    (a checkpoint restores onto any mesh; FSDP only matters where the weights would not fit)."""
    mesh = read(MeshConfig, config.mesh if "mesh" in config else {}, "config.mesh")
    try:
        return sharding.make_mesh(mesh)
    except sharding.MeshError:
        return sharding.make_mesh()


def abstract_weights(model: nn.Module, init_inputs: tuple[jax.Array, ...], mesh: jax.sharding.Mesh) -> Weights:
    """Shapes, dtypes and shardings of a model's weights, without allocating them (kept per process:
    each is a trace of the whole initialiser, and a process restores the same model again and again,
    e.g. evaluate then predict, or init_from then the fine-tune's checkpoints)."""
    inputs = tuple((tuple(x.shape), jnp.dtype(x.dtype)) for x in init_inputs)
    return _abstract_weights(model, inputs, mesh)


@functools.lru_cache(maxsize=8)
def _abstract_weights(model: nn.Module, inputs: tuple[tuple[tuple[int, ...], Any], ...],
                      mesh: jax.sharding.Mesh) -> Weights:
    def init(*init_inputs: jax.Array) -> Weights:
        params, batch_stats = init_variables(model, init_inputs, jax.random.key(0))
        return Weights(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats)

    abstract_inputs = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in inputs]
    return sharding.sharded_abstract_state(jax.eval_shape(init, *abstract_inputs), mesh)  # the training state's layout


def check_outputs_finite(finite: bool, restored: RestoredRun, what: str) -> None:
    """Stops with one line where a restored run's weights give NaN or infinite `what` (evaluate and
    predict reported NaN with status 0): weights of a run that had diverged, or damaged inside a step
    saved before its arrays had fingerprints (`checkpoint.check_fingerprints` catches the others)."""
    if not finite:
        raise ConfigError(f"checkpoint step {restored.step} of {restored.workdir} gives non-finite {what}: its weights "
                          "are damaged (or the run had diverged when it saved them); use another step "
                          "(--config.checkpoint=N)")


def restore_run(workdir: str, which: str = checkpoint.LATEST, flag: str = "--config.checkpoint_dir") -> RestoredRun:
    """Rebuilds a pretrain or finetune run from `workdir` with the weights of checkpoint `which`
    ('latest': the newest step that restores, see `RestoredRun.skipped`, which process 0 also prints
    as one notice line; 'best' or a step number: that step, or a ConfigError saying why not). Reads
    the run folder only, whatever it finds. `flag` is the one that named the run, for the errors."""
    workdir = run_folder.run_workdir(workdir)
    config = run_folder.load_run_config(workdir)
    class_names = run_folder.load_class_names(workdir, required=config.get("stage") == "finetune")
    run_folder.check_class_count(config, class_names, workdir)
    if which == checkpoint.BEST and not read_flat(LoopConfig, config).best_metric:
        how = ("was imported (one checkpoint, ranked by no evaluation)" if config.get("model", {}).get("preset") ==
               IMPORTED_PRESET else "was trained without config.best_metric")
        raise ConfigError(f"the run in {workdir} {how}, so it has no 'best' checkpoint; use --config.checkpoint=latest")
    model, init_inputs = build_model(config)
    mesh = run_mesh(config)
    abstract = abstract_weights(model, init_inputs, mesh)
    manager = checkpoint_manager(workdir, config)
    try:
        weights, step, skipped = _restore_weights(manager, which, abstract, f"{workdir}/{run_folder.CHECKPOINTS}", flag)
    finally:
        manager.close()
    restored = RestoredRun(workdir=workdir, config=config, class_names=class_names, model=model, mesh=mesh,
                           weights=weights, step=step, skipped=tuple(skipped))
    if restored.skipped and jax.process_index() == 0:
        print(restored.skipped_notice(), flush=True)
    return restored


def _restore_weights(
    manager: ocp.CheckpointManager, which: str, abstract: Weights, folder: str, flag: str,
) -> tuple[Weights, int, list[tuple[int, str]]]:
    """The weights of checkpoint `which`: for 'latest' the newest step that restores (a damaged
    newer one is skipped, and listed); a named step or 'best' must restore itself. Never writes."""
    steps = sorted(manager.all_steps())
    if which == checkpoint.LATEST:
        weights, step, skipped = checkpoint.newest_that_restores(
            folder, steps, lambda step: checkpoint.restore_weights(manager, step, abstract),
            advice=f"check that the run's disk is intact, or point {flag} at another run")
        if step is not None:
            return weights, step, skipped
    step = checkpoint.pick_step(manager, which)
    if step is None:
        raise ConfigError(f"no '{which}' checkpoint in {folder} (steps there: {steps})")
    attempt = checkpoint.try_everywhere(lambda step: checkpoint.restore_weights(manager, step, abstract), step)
    if attempt.why:
        named = f"the 'best' checkpoint (step {step})" if which == checkpoint.BEST else f"checkpoint step {step}"
        raise ConfigError(
            f"{named} in {folder} cannot be restored ({attempt.why}); use --config.checkpoint=latest to take "
            f"the newest step that restores (steps there: {steps})") from attempt.error
    return attempt.result, step, []
