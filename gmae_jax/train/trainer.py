"""The training loop shared by pretraining and fine-tuning, read top to bottom: mesh, input pipeline,
state, checkpoint, loop. What differs between the stages comes from `tasks.make_task`."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from gmae_jax import config_checks, config_lib, distributed, host_resources, run_files, schema
from gmae_jax.data import input_workers, pipeline, sources
from gmae_jax.train import (checkpoint, evaluation, init_compile, preemption, resume_check, run_folder, setup, sharding,
                            start_warnings, steps, tasks)
from gmae_jax.train.failed_saves import FailedSaveWatch
from gmae_jax.train.init_from import load_pretrained_encoder
from gmae_jax.train.optim import make_optimizer, warmup_warning
from gmae_jax.train.preemption import PreemptionWatch
from gmae_jax.train.divergence import check_finite
from gmae_jax.train.progress import MetricsWriter, Progress
from gmae_jax.train.summaries import Summaries, run_summary


# What linear probing (config.freeze_encoder) keeps fixed: everything but the classifier head.
FROZEN_BY_LINEAR_PROBING = ("encoder", "pos_embed")


def total_steps(config: ml_collections.ConfigDict, num_train_examples: int) -> int:
    """config.total_steps, or the steps of config.num_epochs over the training images."""
    if config.total_steps > 0:
        return int(config.total_steps)
    steps = max(1, math.ceil(config.num_epochs * num_train_examples / config.batch_size))
    if steps >= config_checks.MAX_STEPS:
        raise config_lib.ConfigError(
            f"config.num_epochs={config.num_epochs} is {steps} steps of {config.batch_size} of the "
            f"{num_train_examples} training images, more than a step count holds (2**31); use fewer epochs")
    return steps


# What a training run keeps in its workdir, by kind (run_files.check_kinds).
RUN_FILES = (run_folder.CONFIG_FILE, run_folder.CLASSES_FILE, run_folder.HISTORY_FILE, run_folder.FACTS_FILE,
             run_folder.METRICS_FILE, tasks.RECONSTRUCTIONS, tasks.CONFUSION_MATRIX, tasks.CONFUSION_MATRIX_JSON,
             tasks.MISTAKES)
RUN_FOLDERS = (run_folder.CHECKPOINTS, run_folder.TENSORBOARD_DIR, checkpoint.DAMAGED)


def check_run_folder_kinds(workdir: str) -> None:
    """One line naming a run file that is a folder, or a run folder that is a file, before anything runs."""
    run_files.check_kinds(workdir, RUN_FILES, RUN_FOLDERS)


def evaluation_owed(eval_every: int, start: int, steps_total: int, writer: MetricsWriter, split: str) -> bool:
    """A resumed step that a straight run evaluated, without its row in metrics.jsonl (process 0 reads
    it; every process gets its answer, as the evaluation is a collective)."""
    due = 0 < start < steps_total and bool(eval_every) and start % eval_every == 0
    owed = due and jax.process_index() == 0 and not writer.has(start, split)
    return due and bool(multihost_utils.broadcast_one_to_all(np.int32(owed)))


def draw(task: tasks.Task, state: steps.TrainState, outputs: Any, workdir: str,
         examples: sources.Source) -> list[str]:
    """The run's pictures (their paths). They come after the last checkpoint and can be drawn again from
    it, so one that cannot be written (a full disk, a folder in its place) is a warning, not a failed run."""
    try:
        return task.draw(state, outputs, workdir, examples)
    except OSError as error:
        logging.warning("could not write the run's pictures (%s: %s); rerunning the same command draws them again",
                        type(error).__name__, error)
        return []


def log_evaluation(task_name: str, step: int, metrics: dict[str, float], what: str = "") -> None:
    logging.info("[%s] step %d eval%s: %s", task_name, step, f" ({what})" if what else "",
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k))


def create_state(
    model: nn.Module, init_inputs: tuple[Any, ...], config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh, steps_total: int, frozen: tuple[str, ...] = (),
) -> tuple[steps.TrainState, optax.Schedule]:
    """Initialises parameters and optimiser state directly with their shardings (no host copy).

    `frozen` names top-level parameter groups the optimiser must never change (linear probing)."""
    init, schedule = _initialiser(model, init_inputs, config, steps_total, frozen)
    rng = jax.random.key(config.seed)
    shardings_of = functools.partial(sharding.state_shardings, mesh=mesh)
    return init_compile.compiled_initialiser(init, rng, shardings_of, mesh)(rng), schedule


def abstract_state(
    model: nn.Module, init_inputs: tuple[Any, ...], config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh, steps_total: int,
) -> steps.TrainState:
    """`create_state`'s shapes, dtypes and shardings without an array: what a step is compiled for
    where the state would not fit on this machine or its devices are only described (`memory_plan`)."""
    init, _ = _initialiser(model, init_inputs, config, steps_total)
    return sharding.sharded_abstract_state(jax.eval_shape(init, jax.random.key(config.seed)), mesh)


def _initialiser(
    model: nn.Module, init_inputs: tuple[Any, ...], config: ml_collections.ConfigDict, steps_total: int,
    frozen: tuple[str, ...] = (),
) -> tuple[Callable[[jax.Array], steps.TrainState], optax.Schedule]:
    tx, schedule = make_optimizer(config.optim, steps_total, config.model.depth, frozen)

    def init(rng: jax.Array) -> steps.TrainState:
        params, batch_stats = setup.init_variables(model, init_inputs, rng)
        return steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx, batch_stats=batch_stats)

    return init, schedule


def make_mesh(config: ml_collections.ConfigDict) -> jax.sharding.Mesh:
    """The run's `config.mesh` over all devices; a shape that does not fit is a config error."""
    try:
        return sharding.make_mesh(config.mesh)
    except sharding.MeshError as error:
        raise config_lib.ConfigError(str(error)) from None


def host_state(state: steps.TrainState) -> steps.TrainState:
    """`state` with parameters and BatchNorm statistics whole in numpy, for work that process 0 does
    alone (pictures): a jit on arrays that span all hosts would wait for the other processes. Every
    process calls it (parameters sharded over several processes are gathered)."""
    return state.replace(params=sharding.tree_to_host(state.params),
                         batch_stats=sharding.tree_to_host(state.batch_stats))


def train(config: ml_collections.ConfigDict, workdir: str, data: sources.Splits) -> dict[str, float]:
    """Trains the model of `config.stage` on `data` to `config.total_steps` (resuming from `workdir`
    if it holds checkpoints) and returns the final evaluation metrics."""
    loop = schema.read_flat(schema.LoopConfig, config)
    data_config = schema.read(schema.DataConfig, config.data, "config.data")
    model, init_inputs = setup.build_model(config)
    task = tasks.make_task(config, model, data.class_names)
    num_workers = input_workers.worker_count(data_config.num_workers)
    eval_args = dict(image_size=model.config.img_size, batch_size=loop.batch_size, num_workers=num_workers)
    # --- Mesh -----------------------------------------------------------------------------------
    mesh = make_mesh(config)  # config_checks.validate_training saw the batch divide over its devices
    host_resources.check_batch_fits(loop.batch_size, model.config.img_size, jax.process_count(),
                                    jax.default_backend() == "cpu")
    pipeline.check_evaluable(data.eval, model.config.img_size)
    logging.info("mesh: %s = %d devices (%s), %d process(es); %s step", sharding.describe(mesh), mesh.size,
                 jax.devices()[0].platform, jax.process_count(), loop.step_impl)
    for warning in [start_warnings.accumulation_warning(loop.grad_accum_steps, jax.default_backend(),
                                                        config.model.conv_impl),
                    *start_warnings.step_layout_warnings(config.stage, loop.step_impl,
                                                         sharding.fsdp_size(mesh), config.model.mask_mode)]:
        if warning:
            logging.warning(warning)

    # --- Resume check: nothing in the workdir changes unless the run there is this one ------------
    steps_total = total_steps(config, len(data.train))
    distributed.check_processes_agree({"training images": len(data.train), "evaluation images": len(data.eval),
                                       "classes": list(data.class_names), "planned steps": steps_total}, "data")
    facts = {resume_check.TRAIN_IMAGES: len(data.train), resume_check.EVAL_IMAGES: len(data.eval),
             resume_check.PLANNED_STEPS: steps_total, resume_check.VIEW: data.eval.view.mode}
    check_run_folder_kinds(workdir)
    changes = resume_check.check(config, workdir, data.class_names, facts)
    if warning := resume_check.evaluation_change_warning(changes):
        logging.warning(warning)

    # --- Input pipeline -------------------------------------------------------------------------
    for warning in (start_warnings.small_dataset_warning(loop.batch_size, len(data.train)),
                    warmup_warning(config.optim.warmup_steps, steps_total),
                    start_warnings.training_split_evaluated_warning(data_config, loop.best_metric)):
        if warning:
            logging.warning(warning)
    train_data = pipeline.make_train_dataset(
        data.train, image_size=model.config.img_size, global_batch_size=loop.batch_size,
        seed=loop.seed, aug=data_config.aug, num_workers=num_workers,
        process_index=jax.process_index(), process_count=jax.process_count())
    train_iter = iter(train_data)
    logging.info("input: %s", "in the trainer's process" if not num_workers else f"{num_workers} grain worker(s)"
                 + (" (config.data.num_workers=-1: a core each, one left to the trainer)"
                    if data_config.num_workers == input_workers.AUTO_WORKERS else ""))

    # --- Model, optimiser and checkpoint --------------------------------------------------------
    frozen = FROZEN_BY_LINEAR_PROBING if config.stage == "finetune" and config.freeze_encoder else ()
    state, schedule = create_state(model, init_inputs, config, mesh, steps_total, frozen)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info("%s: %.2f M parameters, %d steps of %d images; per device: %.1f MB of parameters + "
                 "%.1f MB of optimiser state", task.name, num_params / 1e6, steps_total, loop.batch_size,
                 sharding.bytes_per_device(state.params) / 2**20, sharding.bytes_per_device(state.opt_state) / 2**20)
    split_less = sharding.fsdp_split_less_warning(state, state.params, sharding.fsdp_size(mesh), mesh.size)
    if split_less:
        logging.warning(split_less)
    checkpoint_dir = os.path.join(workdir, run_folder.CHECKPOINTS)
    new_checkpoint_dir = not epath.Path(checkpoint_dir).exists()
    manager = checkpoint.make_manager(checkpoint_dir, loop.keep_checkpoints, loop.best_metric, loop.best_mode)
    for unfinished in checkpoint.remove_unfinished_saves(checkpoint_dir):
        logging.info("removed %s/%s: a save that a kill cut short", checkpoint_dir, unfinished)
    state, last_saved, damaged = checkpoint.restore_last_good(manager, state, train_iter)
    if damaged:
        aside = checkpoint.set_aside(manager, [step for step, _ in damaged])
        logging.warning("resuming from step %d: the %d newer checkpoint(s) did not restore (%s) and were moved "
                        "to %s", last_saved, len(damaged), checkpoint.describe(damaged),
                        aside)
    if last_saved is not None:
        logging.info("resumed from step %d in %s%s", last_saved, checkpoint_dir,
                     f" with changed settings ({resume_check.listing(changes)}; recorded in "
                     f"{run_folder.HISTORY_FILE})" if changes else "")
        if warning := resume_check.schedule_change_warning(changes, last_saved, config.optim.warmup_steps):
            logging.warning(warning)
    elif config.get("init_from"):
        try:
            state = load_pretrained_encoder(state, config.init_from, model.config)
        except Exception:
            # The manager made an empty checkpoints/ that would mark the workdir as a run: take it back.
            if new_checkpoint_dir and jax.process_index() == 0 and not any(epath.Path(checkpoint_dir).iterdir()):
                epath.Path(checkpoint_dir).rmdir()
            raise
    # Only now, with the state restored, may config.json describe this run's settings.
    resume_check.write_run_files(config, workdir, data.class_names, changes, facts)

    train_step = sharding.make_train_step(loop.step_impl, task.loss_fn, mesh, state, loop.grad_accum_steps)
    eval_step = evaluation.compile_eval_step(task, mesh, state)
    rng = jax.random.key(loop.seed + 1)

    # --- Train loop -----------------------------------------------------------------------------
    start = int(jax.device_get(state.step))
    writer = MetricsWriter(workdir, start)
    summaries = Summaries(workdir, schema.read(schema.WandbConfig, config.get("wandb", {}), "config.wandb"),
                          config.to_dict(), task.name, resumed_at=start)
    eval_split = data_config.eval_split
    pictures: list[str] = []
    progress = Progress(steps_total, start, loop.batch_size, num_workers, from_shards=data.train.decoded_once)
    warning = start_warnings.nothing_to_train_warning(start, steps_total)
    if warning:
        logging.warning(warning)
    eval_metrics: dict[str, float] = {}
    watch = PreemptionWatch(manager)
    saves = FailedSaveWatch()
    preempted, finished = False, start
    last_read = start  # the step whose training metrics were last read finite (a run saves finite steps only)

    def evaluate_and_record(step: int) -> tuple[dict[str, float], Any]:
        with progress.not_training():
            metrics, outputs = evaluation.evaluate(task, eval_step, state, data.eval, mesh=mesh, **eval_args)
        log_evaluation(task.name, step, metrics)
        writer.write({"step": step, "split": eval_split, **metrics})
        summaries.scalars(eval_split, step, metrics)
        # e.g. BatchNorm's running averages gone to inf while the batch statistics stay finite:
        # such a checkpoint must not be saved, nor ranked as the best by a NaN.
        stop_if_not_finite({f"{eval_split}/{k}": v for k, v in metrics.items()}, step)
        return metrics, outputs

    def stop_if_not_finite(values: dict[str, float], step: int, last_read: int | None = None) -> None:
        try:
            check_finite(values, step, checkpoint_dir, last_saved, config.model.dtype, last_read)
        except FloatingPointError:
            # Every process stops here (the metrics are global): the save it names goes to disk
            # first, also where the entry point ends a failed multi-process job at once.
            saves.wait(manager)
            raise

    try:
        if evaluation_owed(loop.eval_every, start, steps_total, writer, eval_split):
            # Saved when an input worker died during its evaluation: evaluated now, as a straight run did.
            logging.info("step %d was saved without its evaluation (an input worker died during it): "
                         "evaluating it first", start)
            owed_metrics, _ = evaluate_and_record(start)
            if loop.best_metric:  # ranked for 'best' by the metrics it is saved with
                checkpoint.save_again_with_metrics(manager, start, state, train_iter, owed_metrics)
        if start < steps_total:  # the first step's call compiles it: minutes for a large model on a GPU
            logging.info("[%s] step %d: compiling the train step", task.name, start + 1)
        for step in range(start + 1, steps_total + 1):
            with progress.waiting_for_input():
                host_batch = next(train_iter)
            state, metrics = train_step(state, sharding.global_batch(host_batch, mesh), rng)
            finished = step
            saves.raise_if_failed()  # a save that failed in the background
            if step == start + 1:  # compiling it is most of its time: timed apart from the steady state
                jax.block_until_ready(metrics)
                watch.first_step_done()
                logging.info("[%s] step %d (compiling the step included) took %.1f s", task.name, step,
                             progress.first_step_done(step))
            is_last = step == steps_total
            preempted = watch.should_stop(step) and not is_last
            evaluated = is_last or bool(loop.eval_every and step % loop.eval_every == 0)
            # With a best_metric every evaluated step is saved: orbax then keeps it only if it is the best.
            scheduled_save = (is_last or step % loop.checkpoint_every == 0
                              or (evaluated and bool(loop.best_metric)))
            must_save = scheduled_save or preempted
            if must_save or step % loop.log_every == 0:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                stop_if_not_finite(metrics, step, last_read)  # before any save: a NaN never overwrites a good one
                last_read = step
            # The lines a straight run writes: a resumed run's metrics.jsonl has none for its preemption's step.
            if scheduled_save or step % loop.log_every == 0:
                metrics.update(lr=float(schedule(step - 1)), **progress.update(step))
                with progress.not_training():  # the first writes open files: not the next line's img/s
                    progress.log_line(task.name, step, metrics)
                    writer.write({"step": step, "split": "train", **metrics})
                    summaries.scalars("train", step, metrics)
            if evaluated:
                eval_metrics, outputs = evaluate_and_record(step)
            if must_save:
                with progress.not_training():
                    saves.wait(manager)
                    checkpoint.save(manager, step, state, train_iter, eval_metrics if evaluated else None)
                last_saved = step
            if evaluated and is_last:
                # The last step on disk first (every process): a failed picture loses no training.
                saves.wait(manager)
                drawn_from = host_state(state)  # every process: FSDP may split the parameters over hosts
                if jax.process_index() == 0:
                    pictures = draw(task, drawn_from, outputs, workdir, data.eval)
                    summaries.pictures(eval_split, step, pictures)
            if preempted:
                break
        saves.wait(manager)
    except input_workers.InputWorkerDiedError as error:  # in training's input or in an evaluation's
        # The last step's evaluation is the run's result: saved without it, a rerun would find the run
        # finished and never evaluate it, so that step is not saved (a rerun redoes it, evaluation included).
        done = finished if finished < steps_total else (start if last_saved is None else last_saved)
        last_saved = preemption.save_finished_steps(manager, done, state, train_iter, last_saved, start)
        where = preemption.resume_point(checkpoint_dir, last_saved)
        raise input_workers.InputWorkerDiedError(f"{error}. {where}") from error
    finally:
        train_iter.close()
        watch.close()
        saves.close()
        summaries.close()
    if preempted:
        manager.close()
        raise watch.stopped(last_saved, checkpoint_dir)
    again = None
    if not eval_metrics:  # the workdir already held a finished run: its evaluation and pictures again
        eval_metrics, outputs = evaluation.evaluate(task, eval_step, state, data.eval, mesh=mesh, **eval_args)
        again = eval_metrics
        log_evaluation(task.name, start, eval_metrics, "the finished run evaluated again")
        drawn_from = host_state(state)  # every process: FSDP may split the parameters over hosts
        if jax.process_index() == 0:
            pictures = draw(task, drawn_from, outputs, workdir, data.eval)
    if jax.process_index() == 0:
        print(run_summary(task.name, workdir, manager, loop.best_metric, pictures, again), flush=True)
    manager.close()
    return eval_metrics
