"""Losses: reconstruction error counts masked patches only; targets and smoothing as specified."""

import types

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


def _fixed_logits_model(logits):
    """A stand-in classifier whose output is `logits` whatever the images (steps only call apply)."""
    def apply(variables, images, train, **kwargs):
        return (logits, {"batch_stats": variables["batch_stats"]}) if "mutable" in kwargs else logits
    return types.SimpleNamespace(apply=apply, num_classes=logits.shape[-1])


def test_train_and_evaluation_report_the_same_two_losses_under_the_same_names():
    from gmae_jax.train import steps

    logits = jnp.array([[4.0, 0.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 2.0]])
    labels = jnp.array([0, 1, 0])
    batch = {"image": jnp.zeros((3, 8, 8, 3)), "label": labels}
    model = _fixed_logits_model(logits)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    plain = -log_p[np.arange(3), np.asarray(labels)]
    targets = np.full((3, 3), 0.1 / 3) + 0.9 * np.eye(3)[np.asarray(labels)]
    smoothed = -(targets * log_p).sum(-1)

    _, (train, _) = steps.classifier_loss({}, {}, batch, jax.random.key(0), model=model, label_smoothing=0.1)
    np.testing.assert_allclose(float(train["loss"]), smoothed.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(train["cross_entropy"]), plain.mean(), rtol=1e-6)

    state = types.SimpleNamespace(params={}, batch_stats={})
    valid = jnp.array([1.0, 1.0, 0.0])  # the last row is padding
    sums = steps.classification_eval_step(state, {**batch, "valid": valid}, model=model, label_smoothing=0.1)
    np.testing.assert_allclose(float(sums["loss_sum"]), smoothed[:2].sum(), rtol=1e-6)
    np.testing.assert_allclose(float(sums["cross_entropy_sum"]), plain[:2].sum(), rtol=1e-6)
