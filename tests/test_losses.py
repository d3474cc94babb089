"""Losses: reconstruction error counts masked patches only; targets and smoothing as specified."""

import jax
import jax.numpy as jnp
import numpy as np

from gmae_jax.models.masking import sample_mask
from gmae_jax.train import losses


def test_masked_mse_ignores_visible_patches():
    pred = jax.random.normal(jax.random.key(0), (4, 16, 48))
    target = jax.random.normal(jax.random.key(1), (4, 16, 48))
    mask = sample_mask(jax.random.key(2), 4, 16, 0.5)
    base = losses.masked_mse(pred, target, mask)
    visible_changed = jnp.where(mask[..., None], pred, pred + 100.0)
    masked_changed = jnp.where(mask[..., None], pred + 1.0, pred)
    assert float(losses.masked_mse(visible_changed, target, mask)) == float(base)
    assert float(losses.masked_mse(masked_changed, target, mask)) > float(base)


def test_masked_mse_is_the_mean_over_masked_patches():
    pred, target = jnp.zeros((1, 4, 2)), jnp.array([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0]]])
    mask = jnp.array([[True, False, True, False]])
    np.testing.assert_allclose(float(losses.masked_mse(pred, target, mask)), (1.0 + 9.0) / 2)


def test_masked_mse_weights_drop_padded_examples():
    pred, target = jnp.zeros((2, 2, 1)), jnp.array([[[1.0], [1.0]], [[5.0], [5.0]]])
    mask = jnp.ones((2, 2), bool)
    np.testing.assert_allclose(float(losses.masked_mse(pred, target, mask, jnp.array([1.0, 0.0]))), 1.0)


def test_norm_pix_targets_are_normalised_per_patch():
    images = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    plain = losses.reconstruction_targets(images, 4, norm_pix_loss=False)
    normed = losses.reconstruction_targets(images, 4, norm_pix_loss=True)
    assert abs(float(plain.mean()) - 3.0) < 0.5
    np.testing.assert_allclose(normed.mean(axis=-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(normed.std(axis=-1, ddof=1), 1.0, atol=1e-3)  # MAE's unbiased variance (48 pixels)


def test_label_smoothing_raises_the_loss_of_a_confident_correct_prediction():
    logits = jnp.array([[10.0, 0.0, 0.0]])
    labels = jnp.array([0])
    sharp = losses.classification_loss(logits, labels, 3, 0.0)
    smooth = losses.classification_loss(logits, labels, 3, 0.1)
    assert float(sharp) < 1e-3 < float(smooth)
