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

from gmae_jax import metrics, run_files, visualize
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
    # (weights, per-example outputs, output folder, the evaluated split) -> files written
    draw: Callable[[steps.TrainState, dict[str, np.ndarray], str, sources.Source], list[str]]


def make_task(config: ml_collections.ConfigDict, model: nn.Module, class_names: list[str]) -> Task:
    """The Task of `config.stage` ('pretrain' or 'finetune')."""
    if config.stage == "pretrain":
        return pretrain_task(config, model)
    return finetune_task(config, model, class_names)


# --- Pretraining ---------------------------------------------------------------------------------

def spread_over(indices: np.ndarray, count: int) -> np.ndarray:
    """`count` of the evaluated examples' `indices`, evenly spaced over the split: a split listed class
    by class (as folders and HaGRID's annotations are) then shows several classes, not its first one."""
    ordered = np.sort(np.asarray(indices))
    picks = np.unique(np.linspace(0, len(ordered) - 1, min(count, len(ordered))).round().astype(int))
    return ordered[picks].astype(np.int32)


def pretrain_task(config: ml_collections.ConfigDict, model: nn.Module) -> Task:
    mask_args = dict(mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss)

    def summarize(sums: dict[str, float], _: dict[str, np.ndarray]) -> dict[str, float]:
        return {"loss": sums["loss_sum"] / max(sums["count"], 1.0)}

    def draw(state, outputs, outdir, examples) -> list[str]:
        indices = spread_over(outputs["index"], config.num_reconstructions)
        pixels = [pipeline.eval_example(examples, model.config.img_size, int(index))["image"] for index in indices]
        images = np.asarray(steps.standardize(np.stack(pixels)))
        # Each image with the mask its evaluation used.
        mask = per_example_mask(jax.random.key(steps.EVAL_MASK_SEED), indices, model.config.num_patches,
                                config.mask_ratio)
        pred = jax.jit(functools.partial(
            model.apply, train=False,
            num_visible=num_visible(model.config.num_patches, config.mask_ratio)))(
            {"params": state.params, "batch_stats": state.batch_stats}, images, mask)
        rows = visualize.reconstruction_rows(
            images, np.asarray(mask), np.asarray(pred), model.config.patch_size, config.norm_pix_loss)
        path = os.path.join(outdir, RECONSTRUCTIONS)
        hidden = model.config.num_patches - num_visible(model.config.num_patches, config.mask_ratio)
        visualize.save_reconstructions(
            rows, path, f"step {int(state.step)}; mask ratio {config.mask_ratio:g} ({hidden} of "
                        f"{model.config.num_patches} patches hidden); {len(indices)} of the {len(examples)} "
                        "evaluation images, spread over the split")
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
                  image_size: int, path: str, step: int) -> str:
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
    shown = f" (the first {len(captions)} shown)" if int(wrong.sum()) > len(captions) else ""
    visualize.save_prediction_sheet(images, captions, framed, path, title=(
        f"step {step}: {int(wrong.sum())} of {len(wrong)} evaluation images misclassified{shown}"))
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

    def draw(state, outputs, outdir, examples) -> list[str]:
        matrix = metrics.confusion_matrix(outputs["label"], outputs["predictions"], len(class_names))
        path = os.path.join(outdir, CONFUSION_MATRIX)
        visualize.save_confusion_matrix(matrix, class_names, path, step=int(state.step))
        run_files.write_text(epath.Path(outdir) / CONFUSION_MATRIX_JSON,  # whole: beside a finished evaluation
                             json.dumps({"classes": class_names, "matrix": matrix.tolist(), "step": int(state.step)}))
        return [path, draw_mistakes(examples, outputs, class_names, model.config.img_size,
                                    os.path.join(outdir, MISTAKES), int(state.step))]

    return Task(
        name="finetune",
        loss_fn=functools.partial(steps.classifier_loss, model=model, label_smoothing=config.label_smoothing,
                                  freeze_encoder=config.freeze_encoder),
        eval_step=functools.partial(steps.classification_eval_step, model=model,
                                    label_smoothing=config.label_smoothing),
        summarize=summarize,
        draw=draw,
    )
