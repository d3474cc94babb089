"""Colour jitter of a uint8 batch on the device, computed as PIL computes it on the host.

The input workers draw each example's jitter (`transforms.sample_color_jitter`) and hand it on
beside the uint8 pixels; the train step applies it here. Colour jitter was over half of a worker's
time per view (PIL's HSV round trip alone ~40 %), while on an accelerator it is a few fused
elementwise passes over a batch the step reads anyway.

Same steps, per-example order and 8-bit quantisation as `transforms.apply_color_jitter` (PIL's ImageEnhance
blends, which truncate, and its RGB <-> HSV conversion, which keeps H, S and V in 8 bits), in
float32 where PIL mixes float and double: a value can differ from PIL's by a rounding step
(measured in tests/test_device_jitter.py).
"""

import jax
import jax.numpy as jnp

from gmae_jax.data import transforms

# ITU-R 601-2 luma in PIL's 16-bit fixed point: L = (19595 R + 38470 G + 7471 B + 2^15) >> 16.
_LUMA_WEIGHTS = (19595, 38470, 7471)


def _luma(rgb: jax.Array) -> jax.Array:
    """(..., 3) integer-valued float32 -> (...) float32, PIL's `convert('L')`, bit for bit."""
    ints = rgb.astype(jnp.int32)
    weighted = sum(ints[..., c] * w for c, w in enumerate(_LUMA_WEIGHTS))
    return jnp.right_shift(weighted + (1 << 15), 16).astype(jnp.float32)


def _blend(degenerate: jax.Array, image: jax.Array, factor: jax.Array) -> jax.Array:
    """PIL's `Image.blend(degenerate, image, factor)`: extrapolation clipped, then truncated."""
    return jnp.floor(jnp.clip(degenerate + factor * (image - degenerate), 0.0, 255.0))


def _mean_grey(grey: jax.Array) -> jax.Array:
    """(B, 1, 1) the rounded mean of each image's grey levels `grey` (B, H, W), ImageEnhance.Contrast's
    degenerate."""
    luma = grey.astype(jnp.int32)
    count = luma.shape[-1] * luma.shape[-2]
    total = jnp.sum(luma, axis=(-2, -1), keepdims=True)
    return ((2 * total + count) // (2 * count)).astype(jnp.float32)  # int(mean + 0.5), exactly


def _round_half_up(x: jax.Array) -> jax.Array:
    return jnp.floor(x + 0.5)  # C's round() for the non-negative values here


def _rgb_to_hsv(rgb: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """PIL's RGB -> HSV with H, S, V quantised to 0..255."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    maxc, minc = jnp.max(rgb, axis=-1), jnp.min(rgb, axis=-1)
    grey = maxc == minc
    spread = jnp.where(grey, 1.0, maxc - minc)
    saturation = jnp.where(grey, 0.0, jnp.floor(spread / jnp.maximum(maxc, 1.0) * 255.0))
    rc, gc, bc = (maxc - r) / spread, (maxc - g) / spread, (maxc - b) / spread
    hue = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = jnp.mod(hue / 6.0 + 1.0, 1.0)
    hue = jnp.where(grey, 0.0, jnp.clip(jnp.floor(hue * 255.0), 0.0, 255.0))
    return hue, saturation, maxc


def _hsv_to_rgb(hue: jax.Array, saturation: jax.Array, value: jax.Array) -> jax.Array:
    """PIL's HSV -> RGB of 0..255 values."""
    sector_position = hue * 6.0 / 255.0
    sector = jnp.floor(sector_position)
    fraction = sector_position - sector
    s = saturation / 255.0
    p = jnp.clip(_round_half_up(value * (1.0 - s)), 0.0, 255.0)
    q = jnp.clip(_round_half_up(value * (1.0 - s * fraction)), 0.0, 255.0)
    t = jnp.clip(_round_half_up(value * (1.0 - s * (1.0 - fraction))), 0.0, 255.0)
    v = value
    by_sector = ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))  # (R, G, B) per 60 degrees
    in_sector = [jnp.mod(sector, 6.0) == k for k in range(6)]
    rgb = jnp.stack([jnp.select(in_sector, [row[c] for row in by_sector]) for c in range(3)], axis=-1)
    return jnp.where((saturation == 0.0)[..., None], value[..., None], rgb)


def _shift_hue(rgb: jax.Array, shift: jax.Array) -> jax.Array:
    """Rotate the 8-bit hue by `shift` levels (mod 256). A shift of 0 still quantises through HSV, as
    PIL's round trip does; a NaN shift (`transforms.NO_HUE`) leaves the image untouched."""
    no_hue = jnp.isnan(shift)
    hue, saturation, value = _rgb_to_hsv(rgb)
    levels = jnp.where(no_hue, 0.0, shift)  # no NaN is computed with (jax_debug_nans stays quiet)
    shifted = _hsv_to_rgb(jnp.mod(hue + levels[..., 0], 256.0), saturation, value)
    return jnp.where(no_hue, rgb, shifted)


def _enhance(rgb: jax.Array, op: jax.Array, factors: jax.Array) -> jax.Array:
    """Per example, brightness (op 0), contrast (1) or saturation (2) with its factor of `factors`
    (B, 3): each is ImageEnhance's blend with its own degenerate image (black, the mean grey, the
    pixel's grey), so one blend does whichever an example needs."""
    op = op.reshape(-1, 1, 1)
    grey = _luma(rgb)
    degenerate = jnp.where(op == 0, 0.0, jnp.where(op == 1, _mean_grey(grey), grey))
    factor = jnp.take_along_axis(factors, op.reshape(-1, 1), axis=1).reshape(-1, 1, 1, 1)
    return _blend(degenerate[..., None], rgb, factor)


def color_jitter(images: jax.Array, jitter: jax.Array) -> jax.Array:
    """uint8 (B, H, W, 3) and float32 (B, 8) rows of `transforms.sample_color_jitter` (brightness,
    contrast, saturation factors, hue shift in levels of 256, then the order of the four) -> uint8
    (B, H, W, 3), each example's four in its own order.

    The hue's round trip through HSV is the costly one, so it runs once: the other three that come
    before it in an example's order, then the hue, then the ones after it."""
    order = jitter[:, 4:].astype(jnp.int32)
    hue_at = jnp.argmax(order == transforms.HUE, axis=1).reshape(-1, 1, 1, 1)
    # The three others in their order: the order without the hue (a stable sort moves it last).
    others = jnp.take_along_axis(order, jnp.argsort(order == transforms.HUE, axis=1, stable=True)[:, :3], axis=1)
    rgb = images.astype(jnp.float32)
    for slot in range(3):
        rgb = jnp.where(slot < hue_at, _enhance(rgb, others[:, slot], jitter[:, :3]), rgb)
    rgb = _shift_hue(rgb, jitter[:, 3].reshape(-1, 1, 1, 1))
    for slot in range(3):
        rgb = jnp.where(slot >= hue_at, _enhance(rgb, others[:, slot], jitter[:, :3]), rgb)
    return rgb.astype(jnp.uint8)
