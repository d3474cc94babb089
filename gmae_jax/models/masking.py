"""Patch masking and (un)patchify: pure functions shared by the model, the losses and the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_masked(num_patches: int, mask_ratio: float) -> int:
    """Patches hidden in every example: all but the original's (MAE's) `int(L * (1 - mask_ratio))` kept
    ones (39 of 64 at 0.6, where rounding L * mask_ratio would hide 38)."""
    return num_patches - int(num_patches * (1 - mask_ratio))


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches left visible by `sample_mask`: a static count, which fixes the sparse encoder's shapes."""
    return num_patches - num_masked(num_patches, mask_ratio)


def sample_mask(rng: jax.Array, batch_size: int, num_patches: int, mask_ratio: float) -> jax.Array:
    """Per-example random mask (B, L) bool, True = hidden, with an exact masked count per row."""
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
    return ranks < num_masked(num_patches, mask_ratio)


def per_example_mask(rng: jax.Array, example_ids: jax.Array, num_patches: int, mask_ratio: float) -> jax.Array:
    """`sample_mask` with each row drawn from `rng` folded with its example's id: an example gets the
    same mask in any batch, at any position (evaluation's masked-patch error then does not depend
    on the batch size)."""
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(rng, example_ids)
    return jax.vmap(lambda key: sample_mask(key, 1, num_patches, mask_ratio)[0])(keys)


def visible_ids(mask: jax.Array, count: int) -> jax.Array:
    """(B, L) mask -> (B, count) grid positions of the visible patches, ascending (row-major).

    Every row must have exactly `count` visible patches (as `sample_mask` guarantees); a stable sort
    puts the visible positions first in their grid order, so a row with more visible patches would
    lose its last ones and a row with fewer would pick up masked ones.
    """
    order = jnp.argsort(mask.astype(jnp.int8), axis=1, stable=True)
    return order[:, :count].astype(jnp.int32)


def gather_tokens(x: jax.Array, ids: jax.Array) -> jax.Array:
    """(B, L, ...) and (B, K) positions -> (B, K, ...): the rows of each example at its positions."""
    return jnp.take_along_axis(x, ids.reshape(ids.shape + (1,) * (x.ndim - 2)), axis=1)


def mask_to_pixels(mask: jax.Array, patch_size: int) -> jax.Array:
    """(B, L) patch mask on a square grid -> (B, H, W, 1) pixel mask."""
    batch, length = mask.shape
    grid = int(round(length**0.5))
    pixels = mask.reshape(batch, grid, 1, grid, 1)
    pixels = jnp.broadcast_to(pixels, (batch, grid, patch_size, grid, patch_size))
    return pixels.reshape(batch, grid * patch_size, grid * patch_size, 1)


def hide_masked_pixels(images: jax.Array, mask: jax.Array, patch_size: int) -> jax.Array:
    """Zero (= the dataset mean after normalisation) every pixel of a masked patch.

    With overlapping patch windows a visible token's receptive field reaches into its neighbours;
    zeroing their pixels keeps the encoder blind to what it must reconstruct.
    """
    return jnp.where(mask_to_pixels(mask, patch_size), jnp.zeros((), images.dtype), images)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, L, p*p*C); pixel order within a patch: row, column, channel."""
    batch, height, width, channels = images.shape
    h, w = height // patch_size, width // patch_size
    x = images.reshape(batch, h, patch_size, w, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, h * w, patch_size * patch_size * channels)


def unpatchify(patches: jax.Array, patch_size: int, channels: int = 3) -> jax.Array:
    """Inverse of `patchify` for a square grid."""
    batch, length, _ = patches.shape
    grid = int(round(length**0.5))
    x = patches.reshape(batch, grid, grid, patch_size, patch_size, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, grid * patch_size, grid * patch_size, channels)
