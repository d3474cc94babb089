"""The evaluate stage: scores a checkpoint of a pretrain or finetune run on one split
(configs/evaluate.py). The run is rebuilt from its workdir (`setup.restore_run`); only the evaluated
split is opened, never the training one."""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import ml_collections
from absl import logging
from etils import epath

from gmae_jax import config_checks, config_lib, distributed, host_resources, metrics as metrics_lib, run_files, schema
from gmae_jax.data import sources
from gmae_jax.train import evaluation, run_folder, setup, sharding, tasks
from gmae_jax.train.summaries import Summaries


def validate(config: ml_collections.ConfigDict) -> None:
    setup.validate_run_reference(config)
    config_checks.check(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
    config_checks.check_num_workers(config.num_workers, "num_workers")


def eval_data(config: ml_collections.ConfigDict, run: setup.RestoredRun) -> schema.DataConfig:
    """The run's data section with this stage's overrides (root, split, workers)."""
    data = schema.read(schema.DataConfig, run.config.data, "config.data")
    if not config.data_root and not (data.root and epath.Path(data.root).is_dir()):
        # Typical of a run trained on another machine, or imported from PyTorch (which has no data root).
        where = (f"the run's data root {data.root} (its config.data.root) is not a folder here" if data.root else
                 "the run names no data root (it was imported)")
        raise config_lib.ConfigError(
            f"{where}; pass --config.data_root=FOLDER with the images to evaluate on (and --config.split=NAME if "
            "not its eval split)")
    return dataclasses.replace(data, root=config.data_root or data.root, eval_split=config.split or data.eval_split,
                               num_workers=config.num_workers)


# What evaluate writes into its workdir: the metrics, and the pictures of the evaluated run's kind.
METRICS = "eval_metrics.json"
PICTURES = {"pretrain": (tasks.RECONSTRUCTIONS,),
            "finetune": (tasks.CONFUSION_MATRIX, tasks.CONFUSION_MATRIX_JSON, tasks.MISTAKES)}
OUTPUTS = (METRICS, *(name for names in PICTURES.values() for name in names))


def remove_other_kinds_pictures(workdir: str, stage: str) -> list[str]:
    """An evaluation of the other kind of run into the same workdir left its pictures, which would now
    sit beside these metrics as if they showed this checkpoint: removed (they are evaluate's own)."""
    removed = []
    for other, names in PICTURES.items():
        for name in names if other != stage else ():
            path = epath.Path(workdir) / name
            if path.is_file():
                path.unlink()
                removed.append(str(path))
    return removed


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Writes eval_metrics.json and the task's pictures to `workdir`; returns the metrics."""
    run_folder.check_outside_run(workdir, config.checkpoint_dir, "evaluate")
    run_files.check_kinds(workdir, OUTPUTS, (run_folder.TENSORBOARD_DIR,), keeper="evaluate writes")
    restored = setup.restore_run(config.checkpoint_dir, str(config.checkpoint))
    data = eval_data(config, restored)
    examples = sources.open_split(data, data.eval_split, restored.class_names)
    distributed.check_processes_agree({"evaluation images": len(examples)}, "data")
    task = tasks.make_task(restored.config, restored.model, restored.class_names)
    eval_step = evaluation.compile_eval_step(task, restored.mesh, restored.weights)
    batch_size = evaluation.batch_size_for(config.batch_size, len(examples), restored.mesh)
    host_resources.check_batch_fits(batch_size, restored.model.config.img_size, jax.process_count(),
                                    jax.default_backend() == "cpu")
    if batch_size != config.batch_size:
        logging.info("evaluating in batches of %d: config.batch_size=%d as whole rows for the %d devices, and at "
                     "most the split's %d images", batch_size, config.batch_size, restored.mesh.size, len(examples))
    metrics, outputs = evaluation.evaluate(
        task, eval_step, restored.weights, examples, image_size=restored.model.config.img_size,
        batch_size=batch_size, num_workers=data.num_workers, mesh=restored.mesh)
    setup.check_outputs_finite(all(math.isfinite(v) for v in metrics.values() if isinstance(v, float)), restored,
                               "metrics")
    metrics["checkpoint_step"] = restored.step
    # What was evaluated, beside its scores: the file alone should say it.
    scored = len(outputs["index"])  # unreadable images are left out of the metrics
    evaluated = {"checkpoint_dir": restored.workdir, "data_root": data.root, "split": data.eval_split,
                 "images": scored, "unreadable": len(examples) - scored}
    if restored.config.stage == "pretrain":
        evaluated["mask_ratio"] = float(restored.config.mask_ratio)

    weights = sharding.tree_to_host(restored.weights)  # every process: FSDP may split them over hosts
    if jax.process_index() == 0:
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        run_files.write_text(epath.Path(workdir) / METRICS,
                             json.dumps({**metrics, "evaluated": evaluated}, indent=2, sort_keys=True))
        pictures = task.draw(weights, outputs, workdir, examples)
        for path in remove_other_kinds_pictures(workdir, restored.config.stage):
            logging.info("removed %s: an earlier evaluation's picture of another kind of run", path)
        summaries = Summaries(workdir)
        summaries.scalars(data.eval_split, restored.step, metrics)
        summaries.pictures(data.eval_split, restored.step, pictures)
        summaries.close()
        logging.info("wrote %s", ", ".join([str(epath.Path(workdir) / METRICS), *pictures]))
    logging.info("[evaluate] %s (step %d) on split '%s' of %s: %s", restored.workdir, restored.step,
                 data.eval_split, data.root, ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in metrics.items() if "/" not in k))
    if jax.process_index() == 0:
        if restored.config.stage == "finetune":
            print(metrics_lib.per_class_table(metrics, restored.class_names), flush=True)
        else:
            print(f"masked-patch MSE {metrics['loss']:.5f} (mask ratio {restored.config.mask_ratio})", flush=True)
    return metrics
