"""One function per stage of `configs/<stage>.py`; `main` dispatches on `config.stage`."""

from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import logging
from etils import epath

from gmae_jax import config_lib
from gmae_jax.train import checkpoint, sharding, tasks, trainer


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    return trainer.train(config, workdir, tasks.pretrain_task(config))


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    return trainer.train(config, workdir, tasks.finetune_task(config))


def load_run_config(run_dir: str) -> ml_collections.ConfigDict:
    path = epath.Path(run_dir) / "config.json"
    if not path.exists():
        raise config_lib.ConfigError(
            f"{path} not found: config.checkpoint_dir must be the workdir of a pretrain or finetune run")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Scores the latest checkpoint of a run on a split; writes eval_metrics.json and pictures."""
    run = load_run_config(config.checkpoint_dir)
    if config.data_root:
        run.data.root = config.data_root
    if config.split:
        run.data.eval_split = config.split
    run.batch_size = config.batch_size
    run.data.num_workers = config.num_workers
    task = {"pretrain": tasks.pretrain_task, "finetune": tasks.finetune_task}[run.stage](run)

    mesh = sharding.make_mesh()
    steps_total = trainer.total_steps(run, len(task.train_examples))
    state, _ = trainer.create_state(task.model, task.init_inputs, run, mesh, steps_total)
    manager = checkpoint.make_manager(os.path.join(config.checkpoint_dir, "checkpoints"), run.keep_checkpoints)
    if manager.latest_step() is None:
        raise FileNotFoundError(f"no checkpoint in {config.checkpoint_dir}/checkpoints")
    state = checkpoint.restore(manager, state, None)
    eval_step = sharding.jit_eval_step(task.eval_step, mesh, state)
    metrics, outputs, first = trainer.evaluate(task, eval_step, state, task.eval_examples, run, mesh)
    metrics["checkpoint_step"] = int(jax.device_get(state.step))

    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        (epath.Path(workdir) / "eval_metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        for path in task.draw(trainer.host_state(state), first, outputs, workdir):
            logging.info("wrote %s", path)
    logging.info("[evaluate] %s on %s/%s: %s", config.checkpoint_dir, run.data.root, run.data.eval_split,
                 ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if "/" not in k))
    return metrics
