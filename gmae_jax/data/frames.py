"""The full-frame view's letterbox, with Pillow alone: the PyTorch-only inference path
(`gmae_jax.torch_mirror.exported`) computes it as training and evaluation do."""

from __future__ import annotations

from PIL import Image


def letterbox(img: Image.Image, out_size: int, fill: tuple[int, ...]) -> Image.Image:
    """Full-frame view: longest side resized to out_size (bilinear), centred on a square of `fill`."""
    width, height = img.size
    s = out_size / max(width, height)
    new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
    canvas = Image.new("RGB", (out_size, out_size), fill)
    offset = ((out_size - new_w) // 2, (out_size - new_h) // 2)
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BILINEAR), offset)
    return canvas
