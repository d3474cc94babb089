"""What differs between pretraining and fine-tuning, as data for the one training loop: the model,
its loss and eval step, how evaluation results are summarised and drawn, and the data it reads."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from gmae_jax import config_lib, visualize
from gmae_jax.data import sources
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.masking import num_visible, sample_mask
from gmae_jax.models.presets import model_config
from gmae_jax.train import checkpoint, steps


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    model: nn.Module
    init_inputs: tuple[Any, ...]  # example positional inputs for `model.init`
    loss_fn: steps.LossFn
    eval_step: Callable[[steps.TrainState, steps.Batch], steps.Metrics]
    # (summed eval metrics, per-example outputs) -> reported metrics
    summarize: Callable[[dict[str, float], dict[str, np.ndarray]], dict[str, float]]
    # (state, first eval batch, per-example outputs, output folder) -> files written
    draw: Callable[[steps.TrainState, dict[str, np.ndarray], dict[str, np.ndarray], str], list[str]]
    train_examples: sources.Source
    eval_examples: sources.Source
    class_names: list[str]


def _image_input(config: ml_collections.ConfigDict) -> jax.Array:
    size = config.model.img_size
    return jnp.zeros((1, size, size, config.model.in_channels), jnp.float32)


# --- Pretraining ---------------------------------------------------------------------------------

def pretrain_task(config: ml_collections.ConfigDict) -> Task:
    model = GMAE(model_config(config.model))
    class_names, train, evaluation = sources.open_sources(config.data)
    mask_args = dict(mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss)

    def summarize(sums: dict[str, float], _: dict[str, np.ndarray]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}

    def draw(state, batch, _, outdir) -> list[str]:
        images = batch["image"][: config.num_reconstructions]
        mask = sample_mask(jax.random.key(steps.EVAL_MASK_SEED), images.shape[0],
                           model.config.num_patches, config.mask_ratio)
        pred = jax.jit(functools.partial(
            model.apply, train=False,
            num_visible=num_visible(model.config.num_patches, config.mask_ratio)))(
            {"params": state.params, "batch_stats": state.batch_stats}, images, mask)
        rows = visualize.reconstruction_rows(
            images, np.asarray(mask), np.asarray(pred), model.config.patch_size, config.norm_pix_loss)
        path = os.path.join(outdir, "reconstructions.png")
        visualize.save_reconstructions(rows, path)
        return [path]

    return Task(
        name="pretrain",
        model=model,
        init_inputs=(_image_input(config), jnp.zeros((1, model.config.num_patches), bool)),
        loss_fn=functools.partial(steps.pretrain_loss, model=model, **mask_args),
        eval_step=functools.partial(steps.pretrain_eval_step, model=model, **mask_args),
        summarize=summarize,
        draw=draw,
        train_examples=train,
        eval_examples=evaluation,
        class_names=class_names,
    )


# --- Fine-tuning ---------------------------------------------------------------------------------

def finetune_task(config: ml_collections.ConfigDict) -> Task:
    class_names, train, evaluation = sources.open_sources(config.data)
    if len(class_names) != config.num_classes:
        raise config_lib.ConfigError(
            f"config.num_classes={config.num_classes} but the data in {config.data.root} has "
            f"{len(class_names)} classes ({', '.join(class_names)}); set "
            f"--config.num_classes={len(class_names)}")
    model = GMAEClassifier(model_config(config.model), config.num_classes)

    def summarize(sums: dict[str, float], outputs: dict[str, np.ndarray]) -> dict[str, float]:
        count = max(sums["count"], 1.0)
        matrix = visualize.confusion_matrix(outputs["label"], outputs["predictions"], len(class_names))
        per_class = matrix.diagonal() / np.maximum(matrix.sum(axis=1), 1)
        return {
            "loss": sums["loss_sum"] / count,
            "accuracy": sums["correct"] / count,
            **{f"accuracy/{name}": float(a) for name, a in zip(class_names, per_class)},
        }

    def draw(state, batch, outputs, outdir) -> list[str]:
        matrix = visualize.confusion_matrix(outputs["label"], outputs["predictions"], len(class_names))
        path = os.path.join(outdir, "confusion_matrix.png")
        visualize.save_confusion_matrix(matrix, class_names, path)
        (epath.Path(outdir) / "confusion_matrix.json").write_text(
            json.dumps({"classes": class_names, "matrix": matrix.tolist()}))
        return [path]

    return Task(
        name="finetune",
        model=model,
        init_inputs=(_image_input(config),),
        loss_fn=functools.partial(steps.classification_loss, model=model,
                                  label_smoothing=config.label_smoothing),
        eval_step=functools.partial(steps.classification_eval_step, model=model),
        summarize=summarize,
        draw=draw,
        train_examples=train,
        eval_examples=evaluation,
        class_names=class_names,
    )


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_pretrained_encoder(state: steps.TrainState, checkpoint_dir: str) -> steps.TrainState:
    """Copies the encoder, its position embedding and BatchNorm statistics from a pretraining
    checkpoint into a classifier's state; everything else keeps its fresh initialisation."""
    pretrained = checkpoint.restore_params(checkpoint_dir)
    source = {"encoder": pretrained["params"]["encoder"], "pos_embed": pretrained["params"]["pos_embed"],
              "batch_stats": pretrained["batch_stats"]["encoder"]}
    target = {"encoder": state.params["encoder"], "pos_embed": state.params["pos_embed"],
              "batch_stats": state.batch_stats["encoder"]}
    have, want = _tree_shapes(source), _tree_shapes(target)
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:6]
        raise config_lib.ConfigError(
            f"the pretrained encoder in {checkpoint_dir} does not match config.model (first "
            f"differences: {diff}); use the same --config.model.* as the pretraining run (its "
            "config.json is in its workdir)")
    sharded = jax.tree.map(lambda new, old: jax.device_put(np.asarray(new, old.dtype), old.sharding),
                           source, target)
    logging.info("loaded the pretrained encoder from %s (step %d)", checkpoint_dir, pretrained["step"])
    params = {**state.params, "encoder": sharded["encoder"], "pos_embed": sharded["pos_embed"]}
    batch_stats = {**state.batch_stats, "encoder": sharded["batch_stats"]}
    return state.replace(params=params, batch_stats=batch_stats)
