"""Decoded images made RGB, and the evaluation views' geometry (the centre crop, the full-frame
letterbox, the square around a hand), with Pillow and numpy alone: the PyTorch-only inference path
(`gmae_jax.torch_mirror.exported`) computes them as training and evaluation do."""

from __future__ import annotations

import numpy as np
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


def hand_crop_box(box: tuple[float, float, float, float], image_w: int, image_h: int,
                  scale: float) -> tuple[int, int, int]:
    """(left, top, side) in pixels of the square of side max(w, h) * scale centred on the box (x, y, w, h
    as fractions of the image).

    Rounded outwards, so the square always contains the box; it may leave the image
    (`crop_square` pads).
    """
    x, y, w, h = box[0] * image_w, box[1] * image_h, box[2] * image_w, box[3] * image_h
    half = max(w, h) * scale / 2
    cx, cy = x + w / 2, y + h / 2
    left, top = int(np.floor(cx - half)), int(np.floor(cy - half))
    side = max(int(np.ceil(cx + half)) - left, int(np.ceil(cy + half)) - top, 1)
    return left, top, side


def crop_square(
    img: Image.Image, left: int, top: int, side: int, out_size: int, fill: tuple[int, ...]
) -> Image.Image:
    """The square (left, top, side) resized to out_size, padded with `fill` outside the image.

    Only the part inside the image is resampled, straight to its place in the output, so a
    crop twice the image size costs no more than one the image size.
    """
    canvas = Image.new("RGB", (out_size, out_size), fill)
    width, height = img.size
    x0, y0 = max(left, 0), max(top, 0)
    x1, y1 = min(left + side, width), min(top + side, height)
    if x1 <= x0 or y1 <= y0:
        return canvas
    s = out_size / side
    dx0, dy0 = round((x0 - left) * s), round((y0 - top) * s)
    dx1, dy1 = round((x1 - left) * s), round((y1 - top) * s)
    if dx1 > dx0 and dy1 > dy0:
        part = img.resize((dx1 - dx0, dy1 - dy0), Image.Resampling.BILINEAR, box=(x0, y0, x1, y1))
        canvas.paste(part, (dx0, dy0))
    return canvas
