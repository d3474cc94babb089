"""Losses as pure functions of model outputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from gmae_jax.models.masking import patchify


def reconstruction_targets(images: jax.Array, patch_size: int, norm_pix_loss: bool) -> jax.Array:
    """Patchified pixels (B, L, p*p*C); with `norm_pix_loss`, normalised per patch as MAE does it
    (torch's `.var()`: the unbiased variance)."""
    target = patchify(images, patch_size)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, ddof=1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error over the masked patches only (visible patches contribute nothing).

    `weights` (B,) drops padded examples from evaluation batches.
    """
    per_patch = jnp.mean(jnp.square(pred - target), axis=-1)
    mask = mask.astype(per_patch.dtype)
    if weights is not None:
        mask = mask * weights[:, None]
    return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def classification_loss(
    logits: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float,
    weights: jax.Array | None = None,
) -> jax.Array:
    """Cross-entropy with label smoothing, averaged over the (weighted) examples."""
    targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), label_smoothing)
    losses = optax.softmax_cross_entropy(logits, targets)
    if weights is None:
        return losses.mean()
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1.0)
