"""Scalars and pictures of a run for TensorBoard (event files under WORKDIR/tensorboard/<split>,
written by tensorboardX: no TensorFlow) and, when `config.wandb.enabled`, Weights & Biases.
Only process 0 writes. `metrics.jsonl` (progress.MetricsWriter) stays the plain-text record."""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Iterable
from typing import Any

import jax
import numpy as np
from absl import logging
from etils import epath
from PIL import Image

from gmae_jax import run_files
from gmae_jax.schema import ConfigError, WandbConfig
from gmae_jax.train.run_folder import TENSORBOARD_DIR


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported late (it loads protobuf) and without torch.

    tensorboardX imports torch, where installed (the [torch] extra), only to accept torch tensors,
    which this module never hands it: 1.3-1.8 s of every run's start-up here. Unless something
    already imported torch, the import is refused while tensorboardX loads (it then takes numpy).
    """
    torch_absent = "torch" not in sys.modules
    if torch_absent:
        sys.modules["torch"] = None  # makes `import torch` raise ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if torch_absent:
            del sys.modules["torch"]
    return SummaryWriter


def _wandb_module() -> Any:
    try:
        import wandb  # optional: only when config.wandb.enabled
    except ImportError as error:
        raise ConfigError("config.wandb.enabled=True but the wandb package is not installed; pip install wandb "
                          "or set --config.wandb.enabled=False") from error
    return wandb


WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def wandb_run_id(workdir: str) -> str:
    """The W&B run this workdir logs to, the same after every resume: `resume='allow'` continues a W&B
    run only when given its id (without one, each resume started a new W&B run)."""
    path = epath.Path(workdir) / WANDB_RUN_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:16]
    run_files.write_text(path, run_id)
    return run_id


class Summaries:
    """One TensorBoard writer per split (train, val, ...), so TensorBoard overlays them as runs."""

    def __init__(self, workdir: str, wandb: WandbConfig = WandbConfig(), run_config: dict | None = None,
                 name: str = "", resumed_at: int = 0):
        """`resumed_at`: the step a resumed run restarts after; what an earlier attempt logged beyond it
        (before a crash) is purged, so that TensorBoard shows each step once."""
        self.folder = os.path.join(workdir, TENSORBOARD_DIR)
        self.enabled = jax.process_index() == 0
        self._purge_step = resumed_at + 1 if resumed_at > 0 else None
        self._writers: dict[str, Any] = {}
        self._wandb = None
        if self.enabled and wandb.enabled:
            self._wandb = _wandb_module().init(project=wandb.project, mode=wandb.mode, dir=workdir,
                                               name=name or os.path.basename(os.path.normpath(workdir)),
                                               config=run_config, id=wandb_run_id(workdir), resume="allow")

    def _writer(self, split: str) -> Any:
        if split not in self._writers:
            self._writers[split] = _summary_writer_class()(os.path.join(self.folder, split),
                                                           purge_step=self._purge_step)
        return self._writers[split]

    def scalars(self, split: str, step: int, metrics: dict[str, float]) -> None:
        """Every number of `metrics` as `<name>` in the `split` run (per-class keys keep their '/')."""
        if not self.enabled:
            return
        numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))}
        writer = self._writer(split)
        for key, value in numbers.items():
            writer.add_scalar(key, value, step)
        writer.flush()
        if self._wandb is not None:
            self._wandb.log({f"{split}/{k}": v for k, v in numbers.items()}, step=step)

    def pictures(self, split: str, step: int, paths: Iterable[str]) -> None:
        """PNG files already written (reconstructions, confusion matrix) as images named by file."""
        if not self.enabled:
            return
        writer = self._writer(split)
        images = {}
        for path in paths:
            with epath.Path(path).open("rb") as f, Image.open(f) as picture:  # also on gs://
                pixels = np.asarray(picture.convert("RGB"))
            tag = os.path.splitext(os.path.basename(path))[0]
            writer.add_image(tag, pixels, step, dataformats="HWC")
            images[f"{split}/{tag}"] = pixels
        writer.flush()
        if self._wandb is not None and images:
            wandb = _wandb_module()
            self._wandb.log({k: wandb.Image(v) for k, v in images.items()}, step=step)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        logging.info("TensorBoard: tensorboard --logdir %s", self.folder)


def run_summary(name: str, workdir: str, manager: Any, best_metric: str, pictures: list[str],
                again: dict[str, float] | None = None) -> str:
    """What a person wants at the end of a run: the best evaluation and where everything is. `again`: a
    finished run's final model evaluated once more by a rerun, beside (not instead of) training's scores."""
    lines = [f"=== {name} finished: {workdir} ==="]
    best = manager.best_step() if best_metric else None
    if best is not None:
        value = (manager.metrics(best) or {}).get(best_metric)
        lines.append(f"best {best_metric}: {value:.4f} at step {best}" if value is not None else
                     f"best {best_metric}: step {best}")
    if again:
        metric = best_metric if best_metric in again else next(iter(again))
        lines.append(f"evaluated again by this rerun (the run was finished): {metric} {again[metric]:.4f} at step "
                     f"{manager.latest_step()}; metrics.jsonl and the best checkpoint keep training's evaluations")
    lines.append(f"checkpoints: {manager.directory} (steps {sorted(manager.all_steps())}; "
                 f"evaluate/export with checkpoint=latest{' or best' if best is not None else ''})")
    if pictures:
        final = manager.latest_step()
        other = (f"; the best checkpoint is step {best}: configs/evaluate.py with --config.checkpoint=best draws "
                 "its own"
                 if best is not None and best != final else "")
        lines.append(f"pictures (the final model, step {final}{other}): {', '.join(pictures)}")
    lines.append(f"metrics: {os.path.join(workdir, 'metrics.jsonl')}; "
                 f"TensorBoard: tensorboard --logdir {os.path.join(workdir, TENSORBOARD_DIR)}")
    return "\n".join(lines)
