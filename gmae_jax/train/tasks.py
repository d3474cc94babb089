"""What differs between pretraining and fine-tuning, as data for the one training loop: the loss,
the eval step, and how evaluation results are summarised and drawn. A Task is built from a config
and a model (`setup.build_model`); it holds no data and no weights."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from etils import epath

from gmae_jax import metrics, visualize
from gmae_jax.data import pipeline, sources, views
from gmae_jax.models.masking import num_visible, per_example_mask
from gmae_jax.train import steps

# The pictures each task draws into its workdir at the end of a run.
RECONSTRUCTIONS = "reconstructions.png"
CONFUSION_MATRIX, CONFUSION_MATRIX_JSON = "confusion_matrix.png", "confusion_matrix.json"
MISTAKES, MISTAKES_DRAWN = "misclassified.png", 36


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    loss_fn: steps.LossFn
    eval_step: Callable[[steps.TrainState, steps.Batch], steps.Metrics]
    # (summed eval metrics, per-example outputs) -> reported metrics
    summarize: Callable[[dict[str, float], dict[str, np.ndarray]], dict[str, float]]
    # (weights, first eval batch, per-example outputs, output folder, the evaluated split) -> files written
    draw: Callable[[steps.TrainState, dict[str, np.ndarray], dict[str, np.ndarray], str, sources.Source], list[str]]


def make_task(config: ml_collections.ConfigDict, model: nn.Module, class_names: list[str]) -> Task:
    """The Task of `config.stage` ('pretrain' or 'finetune')."""
    if config.stage == "pretrain":
        return pretrain_task(config, model)
    return finetune_task(config, model, class_names)


# --- Pretraining ---------------------------------------------------------------------------------

def pretrain_task(config: ml_collections.ConfigDict, model: nn.Module) -> Task:
    mask_args = dict(mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss)

    def summarize(sums: dict[str, float], _: dict[str, np.ndarray]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}

    def draw(state, batch, _, outdir, __) -> list[str]:
        images = np.asarray(steps.standardize(batch["image"][: config.num_reconstructions]))
        # Each image with the mask its evaluation used.
        mask = per_example_mask(jax.random.key(steps.EVAL_MASK_SEED), batch["index"][: config.num_reconstructions],
                                model.config.num_patches, config.mask_ratio)
        pred = jax.jit(functools.partial(
            model.apply, train=False,
            num_visible=num_visible(model.config.num_patches, config.mask_ratio)))(
            {"params": state.params, "batch_stats": state.batch_stats}, images, mask)
        rows = visualize.reconstruction_rows(
            images, np.asarray(mask), np.asarray(pred), model.config.patch_size, config.norm_pix_loss)
        path = os.path.join(outdir, RECONSTRUCTIONS)
        visualize.save_reconstructions(rows, path)
        return [path]

    return Task(
        name="pretrain",
        loss_fn=functools.partial(steps.pretrain_loss, model=model, **mask_args),
        eval_step=functools.partial(steps.pretrain_eval_step, model=model, **mask_args),
        summarize=summarize,
        draw=draw,
    )


# --- Fine-tuning ---------------------------------------------------------------------------------

def draw_mistakes(examples: sources.Source, outputs: dict[str, np.ndarray], class_names: list[str],
                  image_size: int, path: str) -> str:
    """The first misclassified images of the split as the classifier saw them, with true and predicted
    class: where the confusion matrix says how often, this says on what. All right: one tile says so."""
    wrong = outputs["label"] != outputs["predictions"]
    images, captions = [], []
    for index, predicted in list(zip(outputs["index"][wrong], outputs["predictions"][wrong]))[:MISTAKES_DRAWN]:
        example = pipeline.eval_example(examples, image_size, int(index))
        images.append(example["image"])
        captions.append([visualize.file_label(views.element_name(examples[int(index)])),
                         f"true: {class_names[int(example['label'])]}", f"predicted: {class_names[int(predicted)]}"])
    framed: list[bool | None] = [False] * len(images)
    if not images:
        images, framed = [np.full((image_size, image_size, 3), 255, np.uint8)], [None]
        captions = [["none misclassified"]]
    visualize.save_prediction_sheet(images, captions, framed, path)
    return path


def finetune_task(config: ml_collections.ConfigDict, model: nn.Module, class_names: list[str]) -> Task:
    def summarize(sums: dict[str, float], outputs: dict[str, np.ndarray]) -> dict[str, float]:
        count = max(sums["count"], 1.0)
        matrix = metrics.confusion_matrix(outputs["label"], outputs["predictions"], len(class_names))
        result = {"loss": sums["loss_sum"] / count, "cross_entropy": sums["cross_entropy_sum"] / count,
                  **metrics.classification_metrics(matrix, class_names)}
        if "top5_correct" in sums:
            result["top5_accuracy"] = sums["top5_correct"] / count
        return result

    def draw(state, batch, outputs, outdir, examples) -> list[str]:
        matrix = metrics.confusion_matrix(outputs["label"], outputs["predictions"], len(class_names))
        path = os.path.join(outdir, CONFUSION_MATRIX)
        visualize.save_confusion_matrix(matrix, class_names, path)
        (epath.Path(outdir) / CONFUSION_MATRIX_JSON).write_text(
            json.dumps({"classes": class_names, "matrix": matrix.tolist(), "step": int(state.step)}))  # which weights
        return [path, draw_mistakes(examples, outputs, class_names, model.config.img_size,
                                    os.path.join(outdir, MISTAKES))]

    return Task(
        name="finetune",
        loss_fn=functools.partial(steps.classifier_loss, model=model, label_smoothing=config.label_smoothing,
                                  freeze_encoder=config.freeze_encoder),
        eval_step=functools.partial(steps.classification_eval_step, model=model,
                                    label_smoothing=config.label_smoothing),
        summarize=summarize,
        draw=draw,
    )
