"""Colour jitter on the device gives the pixels PIL gives on the host."""

import jax
import numpy as np
from PIL import Image, ImageFilter
import pytest

from gmae_jax.data import device_jitter, transforms
from gmae_jax.train import steps

COUNT, SIZE = 12, 24


@pytest.fixture(scope="module")
def images():
    """Noise (every colour pair next to each other) and blurred noise (smooth shades, near-greys)."""
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (COUNT, SIZE, SIZE, 3), dtype=np.uint8)
    smooth = [np.asarray(Image.fromarray(a).filter(ImageFilter.GaussianBlur(2))) for a in noise[::2]]
    return np.concatenate([noise[1::2], np.stack(smooth)])


def _jitters(strengths, seed=0):
    return np.stack([transforms.sample_color_jitter(np.random.default_rng([seed, i]), *strengths)
                     for i in range(COUNT)])


def _on_host(images, jitters):
    return np.stack([np.asarray(transforms.apply_color_jitter(Image.fromarray(a), j))
                     for a, j in zip(images, jitters)])


_on_device = jax.jit(device_jitter.color_jitter)


@pytest.mark.parametrize("strengths", [(0.9, 0, 0, 0), (0, 0.9, 0, 0), (0, 0, 0.9, 0), (0.4, 0.4, 0.4, 0)])
def test_brightness_contrast_and_saturation_are_pils_bit_for_bit(images, strengths):
    jitters = _jitters(strengths)
    assert (jitters[:, :3] > 1).any() and (jitters[:, :3] < 1).any()  # blends and extrapolations

    np.testing.assert_array_equal(np.asarray(_on_device(images, jitters)), _on_host(images, jitters))


def test_hue_shift_matches_pil_but_for_rare_rounding_steps(images):
    """PIL computes the hue in a mix of float and double; float32 lands on the other side of an
    8-bit step for well under 1 % of pixels, which moves a channel by a few levels at most."""
    jitters = _jitters((0.4, 0.4, 0.4, 0.5))
    assert (jitters[:, 3] != 0).all()

    device, host = np.asarray(_on_device(images, jitters)).astype(int), _on_host(images, jitters).astype(int)

    assert np.mean(device == host) > 0.99
    assert np.abs(device - host).max() <= 8
    assert np.mean(np.abs(device - _on_host(images, _jitters((0.4, 0.4, 0.4, 0)))) > 8) > 0.3  # hue moved


def test_each_example_is_jittered_in_its_own_order(images):
    jitters = _jitters((0.4, 0.4, 0.4, 0))
    assert len({tuple(row) for row in jitters[:, 4:]}) > 6  # many orders in one batch

    np.testing.assert_array_equal(np.asarray(_on_device(images, jitters)), _on_host(images, jitters))
    in_one_order = jitters.copy()
    in_one_order[:, 4:] = (3, 2, 1, 0)
    assert not np.array_equal(np.asarray(_on_device(images, in_one_order)), _on_host(images, jitters))


def test_identity_jitter_and_grey_pixels_under_a_hue_shift_are_untouched(images):
    identity = np.tile(transforms.IDENTITY_JITTER, (COUNT, 1))
    greys = np.repeat(images[..., :1], 3, axis=-1)
    half_turn = np.tile(np.array([1, 1, 1, 128, 0, 1, 2, 3], np.float32), (COUNT, 1))

    np.testing.assert_array_equal(np.asarray(_on_device(images, identity)), images)
    np.testing.assert_array_equal(np.asarray(_on_device(greys, half_turn)), greys)


def test_a_drawn_hue_shift_of_zero_still_takes_pils_round_trip(images):
    """torchvision's adjust_hue converts to 8-bit HSV and back whatever the shift; only hue=None
    (NaN here) skips it."""
    zero_shift = np.tile(np.array([1, 1, 1, 0, 0, 1, 2, 3], np.float32), (COUNT, 1))

    device, host = np.asarray(_on_device(images, zero_shift)).astype(int), _on_host(images, zero_shift).astype(int)

    assert np.mean(host != images) > 0.05  # the round trip quantised many pixels
    assert np.mean(device == host) > 0.99
    assert np.abs(device - host).max() <= 8


def test_the_train_step_applies_the_drawn_jitter_and_leaves_other_batches_alone(images):
    jitters = _jitters((0.4, 0.4, 0.4, 0))

    jittered = steps.train_images({"image": images, "color_jitter": jitters})

    # One pixel level is ~0.017 after standardising; 1e-5 only allows for the division's rounding.
    np.testing.assert_allclose(jittered, steps.standardize(_on_host(images, jitters)), atol=1e-5)
    np.testing.assert_allclose(steps.train_images({"image": images}), steps.standardize(images), atol=1e-5)
