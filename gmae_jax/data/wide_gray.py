"""Greyscale images of more than 8 bits as 8-bit pixels. PIL's `convert` clips them at 255, so a
16-bit picture comes out nearly white and a float one nearly black. numpy and Pillow only: the
PyTorch-only inference path (`gmae_jax.torch_mirror.exported`) decodes with it too."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Single-channel modes of more than 8 bits (16-bit PNG / TIFF greyscale opens as one of the integer
# ones) and floating point ('F', e.g. a float TIFF).
MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_8_bits(img: Image.Image) -> np.ndarray:
    """uint8 pixels of a `MODES` image. Integers keep their top 8 of 16 bits (value >> 8), as PIL
    reduces 16-bit RGB; floats are read as [0, 1] when no value exceeds 1 (the float image
    convention), else as PIL's [0, 255]."""
    values = np.asarray(img)
    if img.mode == "F":
        values = np.nan_to_num(values.astype(np.float64))
        scale = 255.0 if values.max(initial=0.0) <= 1.0 else 1.0
        return np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)
    return (np.clip(values.astype(np.int64), 0, 65535) >> 8).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """A `MODES` image as RGB (grey in every channel)."""
    return Image.fromarray(to_8_bits(img), "L").convert("RGB")
