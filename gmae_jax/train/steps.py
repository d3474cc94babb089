"""Pure train and eval steps. They see one global batch and know nothing about devices: sharding is
declared by the caller (`gmae_jax.train.sharding`), so the same functions run on 1 or N devices."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from gmae_jax.data import device_jitter
from gmae_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gmae_jax.models import batch_axes
from gmae_jax.models.masking import num_visible, per_example_mask, sample_mask
from gmae_jax.train import losses

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, batch_stats, batch, rng) -> (loss, (metrics, new_batch_stats))
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, tuple[Metrics, Any]]]

# Evaluation masks come from this fixed stream, so every evaluation scores the same masks.
EVAL_MASK_SEED = 1234


def standardize(images: jax.Array) -> jax.Array:
    """The model's input: uint8 pixels (what the input pipeline yields) standardised with the
    ImageNet statistics, in float32 on the device; float images are taken as standardised already
    (synthetic benchmark batches, tests)."""
    if images.dtype != jnp.uint8:
        return images
    return (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def train_images(batch: Batch) -> jax.Array:
    """A training batch's model input: the colour jitter the input workers drew, applied here on the
    device (`device_jitter`; batches without one, e.g. synthetic, are left alone), then standardised."""
    images = batch["image"]
    if "color_jitter" in batch:
        images = device_jitter.color_jitter(images, batch["color_jitter"])
    return standardize(images)


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics; orbax saves it whole."""

    batch_stats: Any = None


def pretrain_loss(
    params: Any, batch_stats: Any, batch: Batch, rng: jax.Array, *,
    model: nn.Module, mask_ratio: float, norm_pix_loss: bool,
) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Masked-patch MSE of the G-MAE model on a freshly sampled mask."""
    mask_rng, dropout_rng = jax.random.split(rng)
    images = train_images(batch)
    mask = batch_axes.global_rows(
        lambda rows: sample_mask(mask_rng, rows, model.config.num_patches, mask_ratio), images.shape[0])
    pred, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, mask, train=True,
        num_visible=num_visible(model.config.num_patches, mask_ratio),
        rngs={"dropout": batch_axes.per_device_key(dropout_rng)}, mutable=["batch_stats"],
    )
    target = losses.reconstruction_targets(images, model.config.patch_size, norm_pix_loss)
    loss = losses.masked_mse(pred, target, mask)
    return loss, ({"loss": loss}, updates["batch_stats"])


def classifier_loss(
    params: Any, batch_stats: Any, batch: Batch, rng: jax.Array, *,
    model: nn.Module, label_smoothing: float, freeze_encoder: bool = False,
) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Label-smoothed cross-entropy of the classifier, with training accuracy and the plain
    cross-entropy (what evaluation's `cross_entropy` reports: smoothing alone keeps the objective
    above zero, ~0.29 for 3 classes at 0.1, so only the plain one compares with a confident model).

    `freeze_encoder` is linear probing: the encoder runs as in evaluation (BatchNorm on its
    running averages, no dropout) behind a stop_gradient, so only the head learns and XLA skips
    the encoder's backward pass; the optimiser leaves the encoder's parameters untouched.
    """
    variables, images = {"params": params, "batch_stats": batch_stats}, train_images(batch)
    if freeze_encoder:
        features = model.apply(variables, images, train=False, method=model.features)
        logits = model.apply(variables, jax.lax.stop_gradient(features), method=model.classify)
        new_batch_stats = batch_stats
    else:
        logits, updates = model.apply(
            variables, images, train=True,
            rngs={"dropout": batch_axes.per_device_key(rng)}, mutable=["batch_stats"],
        )
        new_batch_stats = updates["batch_stats"]
    loss = losses.classification_loss(logits, batch["label"], model.num_classes, label_smoothing)
    cross_entropy = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]))
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"loss": loss, "cross_entropy": cross_entropy, "accuracy": accuracy}, new_batch_stats)


def micro_batches(batch: Batch, count: int) -> Batch:
    """(B, ...) -> (count, B / count, ...), micro-batch j = rows j, j + count, j + 2 count, ...

    Strided rather than contiguous: each device holds a contiguous block of the batch, so every
    micro-batch keeps rows on every device and the accumulation loop needs no resharding.
    """
    return jax.tree.map(lambda x: jnp.swapaxes(x.reshape(x.shape[0] // count, count, *x.shape[1:]), 0, 1),
                        batch)


def loss_gradients(
    params: Any, batch_stats: Any, batch: Batch, rng: jax.Array, *, loss_fn: LossFn, accum_steps: int = 1,
) -> tuple[Any, Metrics, Any]:
    """Gradients of the mean loss over `batch`, in `accum_steps` sequential micro-batches.

    Accumulating k micro-batches gives the gradient of one batch k times larger wherever the loss
    is a mean over examples; BatchNorm (in training mode) normalises each micro-batch by its own
    statistics and updates its running averages once per micro-batch, as PyTorch would. Peak
    activation memory is that of one micro-batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (_, (metrics, batch_stats)), grads = grad_fn(params, batch_stats, batch, rng)
        return grads, metrics, batch_stats

    def accumulate(carry, indexed_micro_batch):
        grad_sum, metric_sum, stats = carry
        index, micro_batch = indexed_micro_batch
        (_, (metrics, stats)), grads = grad_fn(params, stats, micro_batch, jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, grad_sum, grads), jax.tree.map(jnp.add, metric_sum, metrics), stats), None

    stacked = micro_batches(batch, accum_steps)
    first = jax.tree.map(lambda x: x[0], stacked)
    metric_shapes = jax.eval_shape(lambda: grad_fn(params, batch_stats, first, rng)[0][1][0])
    zeros = (jax.tree.map(jnp.zeros_like, params),
             jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes), batch_stats)
    (grad_sum, metric_sum, batch_stats), _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(accum_steps), stacked))
    scale = lambda tree: jax.tree.map(lambda x: x / accum_steps, tree)  # noqa: E731
    return scale(grad_sum), scale(metric_sum), batch_stats


def train_step(
    state: TrainState, batch: Batch, rng: jax.Array, *, loss_fn: LossFn, accum_steps: int = 1,
) -> tuple[TrainState, Metrics]:
    """One optimiser step. The step's randomness is `fold_in(rng, step)`: a resumed run repeats it."""
    step_rng = jax.random.fold_in(rng, state.step)
    grads, metrics, batch_stats = loss_gradients(
        state.params, state.batch_stats, batch, step_rng, loss_fn=loss_fn, accum_steps=accum_steps)
    return apply_gradients(state, grads, metrics, batch_stats)


def apply_gradients(state: TrainState, grads: Any, metrics: Metrics, batch_stats: Any) -> tuple[TrainState, Metrics]:
    """The optimiser update and the step's reported metrics (shared by the jit and shard_map steps)."""
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def pretrain_eval_step(
    state: TrainState, batch: Batch, *, model: nn.Module, mask_ratio: float, norm_pix_loss: bool,
) -> Metrics:
    """Sums over one evaluation batch (padding excluded by `batch['valid']`): squared error, count."""
    images = standardize(batch["image"])
    mask = per_example_mask(jax.random.key(EVAL_MASK_SEED), batch["index"], model.config.num_patches, mask_ratio)
    pred = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, mask, train=False,
                       num_visible=num_visible(model.config.num_patches, mask_ratio))
    target = losses.reconstruction_targets(images, model.config.patch_size, norm_pix_loss)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    weights = mask * batch["valid"][:, None]
    return {"loss_sum": jnp.sum(per_patch * weights), "count": jnp.sum(weights)}


def classification_eval_step(state: TrainState, batch: Batch, *, model: nn.Module,
                             label_smoothing: float = 0.0) -> Metrics:
    """Per-batch sums for accuracy, top-5 accuracy (more than 5 classes), the loss (training's
    objective: smoothed as training smooths, so `loss` means the same on both splits) and the plain
    cross-entropy, plus predictions for the confusion matrix."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, standardize(batch["image"]),
                         train=False)
    valid, labels = batch["valid"], batch["label"]
    predictions = jnp.argmax(logits, -1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    smoothed = optax.softmax_cross_entropy(
        logits, optax.smooth_labels(jax.nn.one_hot(labels, model.num_classes), label_smoothing))
    sums = {
        "loss_sum": jnp.sum(smoothed * valid),
        "cross_entropy_sum": jnp.sum(nll * valid),
        "correct": jnp.sum((predictions == labels) * valid),
        "count": jnp.sum(valid),
        "predictions": predictions,
    }
    if model.num_classes > 5:
        top5 = jax.lax.top_k(logits, 5)[1]
        sums["top5_correct"] = jnp.sum(jnp.any(top5 == labels[:, None], axis=-1) * valid)
    return sums
