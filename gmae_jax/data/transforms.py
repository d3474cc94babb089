"""Image decoding and augmentation on PIL images; randomness only through the given Generator.

Pure functions so that a grain `random_map` seeded per element gives the same pixels in any
worker, which is what makes batches independent of the worker count.
"""

import io
import math

from etils import epath
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from gmae_jax.data import frames

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

_BILINEAR = Image.Resampling.BILINEAR


class ImageDecodeError(ValueError):
    """An image file could not be decoded; the message names the file."""


def decode_rgb(
    path_or_bytes: str | epath.PathLike | bytes, draft_size: int | None = None, name: str | None = None,
) -> Image.Image:
    """Decodes a file (any epath, e.g. gs://) or bytes to an upright RGB image.

    `draft_size` lets libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale while both sides
    stay >= draft_size, which is most of the decode cost for full-HD photos. `name` is what an
    ImageDecodeError calls the image (default: the path, or "<bytes>").
    """
    is_bytes = isinstance(path_or_bytes, bytes)
    name = name or ("<bytes>" if is_bytes else str(path_or_bytes))
    try:
        data = path_or_bytes if is_bytes else epath.Path(path_or_bytes).read_bytes()
    except OSError as e:
        raise ImageDecodeError(f"Cannot decode image {name}: {e}") from e
    if not data:
        raise ImageDecodeError(f"Cannot decode image {name}: the file is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if draft_size is not None:
                img.draft("RGB", (draft_size, draft_size))
            img.load()
            return frames.to_rgb(ImageOps.exif_transpose(img))
    except Image.UnidentifiedImageError as e:  # PIL's message ends in the repr of our BytesIO
        raise ImageDecodeError(f"Cannot decode image {name}: not an image PIL can read") from e
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ImageDecodeError(f"Cannot decode image {name}: {e}") from e


def random_resized_crop(
    img: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> Image.Image:
    """Crop of random area fraction and aspect ratio resized to size x size (torchvision rules).

    After 10 rejected draws it falls back to the largest centre crop within `ratio`.
    """
    width, height = img.size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            break
    else:
        in_ratio = width / height
        if in_ratio < min(ratio):
            w, h = width, round(width / min(ratio))
        elif in_ratio > max(ratio):
            w, h = round(height * max(ratio)), height
        else:
            w, h = width, height
        top, left = (height - h) // 2, (width - w) // 2
    # Cut first, as torchvision's resized_crop does: a resize with box= would blend pixels from just
    # outside the box into the border row and column.
    return img.crop((left, top, left + w, top + h)).resize((size, size), _BILINEAR)


def horizontal_flip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """Mirrors the image with probability p."""
    if rng.random() < p:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


# A view's colour jitter: brightness, contrast, saturation factors, hue shift in levels of 256, then
# the order the four are applied in (0-3 in that same numbering), as torchvision's ColorJitter draws it.
# The hue shift is NaN where no hue jitter is drawn (torchvision's hue=None): a drawn shift of 0 still
# takes PIL's HSV round trip, which quantises H and S, as torchvision's adjust_hue does.
NO_HUE = np.nan
IDENTITY_JITTER = np.array([1.0, 1.0, 1.0, NO_HUE, 0.0, 1.0, 2.0, 3.0], np.float32)
HUE = 3  # the hue's number in the order


def sample_color_jitter(
    rng: np.random.Generator, brightness: float, contrast: float, saturation: float, hue: float
) -> np.ndarray:
    """One view's colour jitter as float32, drawn as torchvision's ColorJitter draws it: a random order
    of the four, brightness, contrast, saturation factors in [1-x, 1+x], and a hue shift of
    `hue_factor * 255` levels of 256 truncated toward zero (hue_factor from [-hue, hue] turns), which is
    how torchvision shifts PIL's 8-bit hue. Strengths of 0 draw nothing and leave that property alone
    (the hue's shift is then `NO_HUE`).
    The train step applies it on the device (`device_jitter.color_jitter`)."""
    jitter = IDENTITY_JITTER.copy()
    if max(brightness, contrast, saturation, hue) <= 0:
        return jitter
    jitter[4:] = rng.permutation(4)
    for j, strength in enumerate((brightness, contrast, saturation)):
        if strength > 0:
            jitter[j] = rng.uniform(max(0.0, 1 - strength), 1 + strength)
    if hue > 0:
        jitter[3] = int(rng.uniform(-hue, hue) * 255)  # int() truncates toward zero, as np.int32() does
    return jitter


def apply_color_jitter(img: Image.Image, jitter: np.ndarray) -> Image.Image:
    """`sample_color_jitter`'s jitter applied with PIL in its drawn order, as torchvision's ColorJitter
    does to a PIL image; the hue is rotated in PIL's 8-bit HSV."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for op in jitter[4:].astype(int):
        if op != HUE and jitter[op] != 1:
            img = enhancers[op](img).enhance(float(jitter[op]))
        elif op == HUE and not np.isnan(jitter[HUE]):
            hsv = np.array(img.convert("HSV"))
            hsv[..., 0] = (hsv[..., 0].astype(np.int16) + int(jitter[HUE])) % 256
            img = Image.fromarray(hsv, "HSV").convert("RGB")
    return img


def pixels(img: Image.Image) -> np.ndarray:
    """uint8 HWC array: what the input pipeline hands on. Standardising (ImageNet statistics) happens
    on the device, in the step (`steps.standardize`): float32 pixels are 4x the bytes through the
    workers' shared memory and onto the device, and the division costs each worker ~15 % of a view."""
    return np.asarray(img, dtype=np.uint8)


def normalize(img: Image.Image) -> np.ndarray:
    """float32 HWC array standardised with the ImageNet statistics, on the host (as torchvision's
    ToTensor + Normalize do; `steps.standardize` is the same on the device)."""
    values = np.asarray(img, dtype=np.float32) / 255.0
    return (values - IMAGENET_MEAN) / IMAGENET_STD
