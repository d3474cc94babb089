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

from gmae_jax.models.masking import num_visible, sample_mask
from gmae_jax.train import losses

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]
# loss_fn(params, batch_stats, batch, rng) -> (loss, (metrics, new_batch_stats))
LossFn = Callable[[Any, Any, Batch, jax.Array], tuple[jax.Array, tuple[Metrics, Any]]]

# Evaluation masks come from this fixed stream, so every evaluation scores the same masks.
EVAL_MASK_SEED = 1234


class TrainState(train_state.TrainState):
    """Flax TrainState plus BatchNorm running statistics; orbax saves it whole."""

    batch_stats: Any = None


def pretrain_loss(
    params: Any, batch_stats: Any, batch: Batch, rng: jax.Array, *,
    model: nn.Module, mask_ratio: float, norm_pix_loss: bool,
) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Masked-patch MSE of the G-MAE model on a freshly sampled mask."""
    mask_rng, dropout_rng = jax.random.split(rng)
    images = batch["image"]
    mask = sample_mask(mask_rng, images.shape[0], model.config.num_patches, mask_ratio)
    pred, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, mask, train=True,
        num_visible=num_visible(model.config.num_patches, mask_ratio),
        rngs={"dropout": dropout_rng}, mutable=["batch_stats"],
    )
    target = losses.reconstruction_targets(images, model.config.patch_size, norm_pix_loss)
    loss = losses.masked_mse(pred, target, mask)
    return loss, ({"loss": loss}, updates["batch_stats"])


def classification_loss(
    params: Any, batch_stats: Any, batch: Batch, rng: jax.Array, *,
    model: nn.Module, label_smoothing: float,
) -> tuple[jax.Array, tuple[Metrics, Any]]:
    """Label-smoothed cross-entropy of the classifier, with training accuracy."""
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, batch["image"], train=True,
        rngs={"dropout": rng}, mutable=["batch_stats"],
    )
    loss = losses.classification_loss(logits, batch["label"], model.num_classes, label_smoothing)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["label"])
    return loss, ({"loss": loss, "accuracy": accuracy}, updates["batch_stats"])


def train_step(state: TrainState, batch: Batch, rng: jax.Array, *, loss_fn: LossFn) -> tuple[TrainState, Metrics]:
    """One optimiser step. The step's randomness is `fold_in(rng, step)`: a resumed run repeats it."""
    step_rng = jax.random.fold_in(rng, state.step)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (_, (metrics, batch_stats)), grads = grad_fn(state.params, state.batch_stats, batch, step_rng)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    return state, {**metrics, "grad_norm": optax.tree.norm(grads)}


def pretrain_eval_step(
    state: TrainState, batch: Batch, *, model: nn.Module, mask_ratio: float, norm_pix_loss: bool,
) -> Metrics:
    """Sums over one evaluation batch (padding excluded by `batch['valid']`): squared error, count."""
    images = batch["image"]
    mask = sample_mask(jax.random.key(EVAL_MASK_SEED), images.shape[0], model.config.num_patches, mask_ratio)
    pred = model.apply({"params": state.params, "batch_stats": state.batch_stats}, images, mask, train=False,
                       num_visible=num_visible(model.config.num_patches, mask_ratio))
    target = losses.reconstruction_targets(images, model.config.patch_size, norm_pix_loss)
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    weights = mask * batch["valid"][:, None]
    return {"loss_sum": jnp.sum(per_patch * weights), "count": jnp.sum(weights)}


def classification_eval_step(state: TrainState, batch: Batch, *, model: nn.Module) -> Metrics:
    """Per-batch sums for accuracy and loss, plus predictions for the confusion matrix."""
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, batch["image"], train=False)
    valid = batch["valid"]
    predictions = jnp.argmax(logits, -1)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    return {
        "loss_sum": jnp.sum(nll * valid),
        "correct": jnp.sum((predictions == batch["label"]) * valid),
        "count": jnp.sum(valid),
        "predictions": predictions,
    }
