"""Decoded images made RGB, and the evaluation views' geometry (the centre crop, the full-frame
letterbox), with Pillow alone: the PyTorch-only inference path (`gmae_jax.torch_mirror.exported`)
computes them as training and evaluation do."""

from __future__ import annotations

from PIL import Image

from gmae_jax.data import wide_gray

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode as RGB: 16/32-bit grey scaled down (Pillow's convert clips it at 255),
    transparent pixels composited on black (they carry no colour the model should see)."""
    if img.mode == "RGB" and "transparency" not in img.info:  # an RGB PNG may name a transparent colour
        return img
    if img.mode in wide_gray.MODES:
        return wide_gray.to_rgb(img)
    if img.mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (0, 0, 0))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def letterbox(img: Image.Image, out_size: int, fill: tuple[int, ...]) -> Image.Image:
    """Full-frame view: longest side resized to out_size (bilinear), centred on a square of `fill`."""
    width, height = img.size
    s = out_size / max(width, height)
    new_w, new_h = max(1, round(width * s)), max(1, round(height * s))
    canvas = Image.new("RGB", (out_size, out_size), fill)
    offset = ((out_size - new_w) // 2, (out_size - new_h) // 2)
    canvas.paste(img.resize((new_w, new_h), Image.Resampling.BILINEAR), offset)
    return canvas


def resize_center_crop(img: Image.Image, size: int, crop_fraction: float = 0.875) -> Image.Image:
    """Evaluation view: the central crop_fraction of the shorter side, resized to size x size.

    One resize of the (fractional) crop box: what resizing the shorter side to size / crop_fraction and
    then centre-cropping computes, without resampling the discarded border, and without the whole-pixel
    rounding of torchvision's Resize(int(size / crop_fraction)) + CenterCrop(size). That crops the same
    box only where size / crop_fraction is whole (224 at 0.875: square images the same, non-square ones
    about 1 level of 255 away); elsewhere (32 px: Resize(36) keeps 32/36 of the side) another box.
    """
    width, height = img.size
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
