"""Where the visible tokens of a masked grid sit, for the sparse encoder (`mask_mode='sparse'`).

The sparse encoder carries only the visible tokens (B, L_vis, C), like MAE, but its convolutions
need neighbours on the grid. As in SparK/ConvMAE, masked cells hold zero through every convolution,
and a convolution is evaluated only at visible cells: each visible token reads its k x k (dilated)
window from the visible tokens, with masked and out-of-grid cells reading zero. That is exactly a
dense convolution of the zero-filled grid, read at the visible cells, at L_vis / L of its cost.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gmae_jax.models import masking


@functools.lru_cache(maxsize=64)
def _window_cells(height: int, width: int, kernel_size: int, dilation: int) -> np.ndarray:
    """(H*W, k*k) grid cell read by each window position of each cell; H*W where it leaves the grid."""
    rows, cols = np.divmod(np.arange(height * width), width)
    offsets = dilation * (np.arange(kernel_size) - kernel_size // 2)
    r = rows[:, None, None] + offsets[None, :, None]
    c = cols[:, None, None] + offsets[None, None, :]
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
    cells = np.where(inside, r * width + c, height * width)
    return cells.reshape(height * width, kernel_size * kernel_size).astype(np.int32)


@flax.struct.dataclass
class VisibleGrid:
    """The visible tokens of an H x W token grid, per example.

    ids: (B, L_vis) grid positions of the visible tokens, ascending; the sparse encoder's tokens are
    in this order. slots: (B, H*W) each cell's index among the visible tokens, L_vis where masked.
    """

    ids: jax.Array
    slots: jax.Array
    height: int = flax.struct.field(pytree_node=False)
    width: int = flax.struct.field(pytree_node=False)

    @classmethod
    def from_mask(cls, mask: jax.Array, num_visible: int, height: int, width: int) -> VisibleGrid:
        """From a (B, H*W) mask (True = hidden) with exactly `num_visible` visible cells per row."""
        ids = masking.visible_ids(mask, num_visible)
        batch = mask.shape[0]
        slots = jnp.full((batch, height * width), num_visible, jnp.int32)
        slots = slots.at[jnp.arange(batch)[:, None], ids].set(jnp.arange(num_visible, dtype=jnp.int32))
        return cls(ids=ids, slots=slots, height=height, width=width)

    @property
    def num_visible(self) -> int:
        return self.ids.shape[1]

    def gather(self, x: jax.Array) -> jax.Array:
        """(B, H*W, C) grid tokens -> (B, L_vis, C) visible tokens."""
        return masking.gather_tokens(x, self.ids)

    def scatter(self, tokens: jax.Array) -> jax.Array:
        """(B, L_vis, C) visible tokens -> (B, H*W, C) grid tokens, zero at masked cells."""
        return masking.gather_tokens(_with_zero_row(tokens), self.slots)

    def windows(self, tokens: jax.Array, kernel_size: int, dilation: int = 1) -> jax.Array:
        """(B, L_vis, C) -> (B, L_vis, k, k, C): each visible token's conv window on the grid, with
        masked and out-of-grid cells read as zero (the zero padding of a 'same' convolution)."""
        batch, count, channels = tokens.shape
        cells = jnp.asarray(_window_cells(self.height, self.width, kernel_size, dilation))[self.ids]
        # Out-of-grid cells (index H*W) map to the zero row, like masked ones.
        slots = jnp.pad(self.slots, ((0, 0), (0, 1)), constant_values=count)
        reads = masking.gather_tokens(slots, cells.reshape(batch, -1))
        window = masking.gather_tokens(_with_zero_row(tokens), reads)
        return window.reshape(batch, count, kernel_size, kernel_size, channels)


class VisibleConv(nn.Module):
    """A 'same' k x k convolution evaluated at the visible cells only: (B, L_vis, C) -> (B, L_vis, F).

    Parameters are nn.Conv's (`kernel` (k, k, C, F), `bias` (F,)), so a sparse-pretrained layer is a
    dense layer. Each token's window times the flattened kernel is one matmul; on CPU this is
    about twice as fast as an nn.Conv over a batch of k x k windows. The windows (k*k times the
    tokens) are gathered again in the backward pass rather than kept, as `fast_conv` does.
    """

    features: int
    kernel_size: int
    dilation: int = 1
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
    dtype: Any = None

    @nn.compact
    def __call__(self, tokens: jax.Array, visible: VisibleGrid) -> jax.Array:
        k, channels = self.kernel_size, tokens.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (k, k, channels, self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        tokens, kernel, bias = nn.dtypes.promote_dtype(tokens, kernel, bias, dtype=self.dtype)
        if k == 1:
            return tokens @ kernel.reshape(channels, self.features) + bias
        return _windows_times_kernel(tokens, kernel, visible, self.dilation) + bias


@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(3,))
def _windows_times_kernel(tokens: jax.Array, kernel: jax.Array, visible: VisibleGrid, dilation: int) -> jax.Array:
    k, _, channels, features = kernel.shape
    window = visible.windows(tokens, k, dilation)
    return window.reshape(window.shape[:2] + (k * k * channels,)) @ kernel.reshape(k * k * channels, features)


def _with_zero_row(tokens: jax.Array) -> jax.Array:
    """Appends a zero token at index L_vis, where masked and out-of-grid reads land."""
    return jnp.pad(tokens, ((0, 0), (0, 1), (0, 0)))
