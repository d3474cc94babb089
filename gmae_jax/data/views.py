"""How one record becomes model pixels and a label, for training and evaluation.

Three views: 'original' (the G-MAE class folders: random resized crop / resize + centre
crop), 'full_frame' (letterboxed HaGRID frame) and 'hand_crop' (square around the gesture
box). Pure functions of (record, image bytes or path, rng), so grain workers agree on every
pixel whatever their number.
"""

import dataclasses
import math

import numpy as np
from PIL import Image

from gmae_jax.data import crops, frames, transforms
from gmae_jax.schema import AugmentConfig, DataConfig
from gmae_jax.data.class_folders import Example
from gmae_jax.data.hagrid import Box, HagridRecord
from gmae_jax.data.record_filters import gesture_label

# The views of HaGRID's annotated frames (what the prepare stage stores and config.data.mode picks);
# "original" is a class folder's image as it is.
HAGRID_VIEWS = ("full_frame", "hand_crop")
VIEWS = ("original",) + HAGRID_VIEWS
EVAL_CROP_FRACTION = 0.875


def centre_crop_share(width: int, height: int) -> float:
    """The share of an image's area the centre crop ('original' view) shows: 0.77 for a square, 0.43 for
    16:9, 0.02 for a 40:1 strip, whose hand may well lie outside it."""
    return (min(width, height) * EVAL_CROP_FRACTION) ** 2 / max(width * height, 1)


@dataclasses.dataclass(frozen=True)
class ViewConfig:
    """Everything a view needs besides the record; picklable for grain workers. The augmentation
    and hand-crop fields mean what they mean in `gmae_jax.schema` and default to its values."""

    mode: str = "original"
    image_size: int = 224
    class_names: tuple[str, ...] = ()
    crop_scale_min: float = AugmentConfig.crop_scale_min  # random resized crop (original, full_frame)
    hflip: bool = AugmentConfig.hflip
    brightness: float = AugmentConfig.brightness
    contrast: float = AugmentConfig.contrast
    saturation: float = AugmentConfig.saturation
    hue: float = AugmentConfig.hue
    crop_scale_max: float = DataConfig.crop_scale_max  # hand_crop: training scale ~ U(1, this)
    no_gesture_prob: float = DataConfig.no_gesture_prob  # hand_crop: free no_gesture hand instead

    def __post_init__(self) -> None:
        if self.mode not in VIEWS:
            raise ValueError(f"view mode {self.mode!r} is not one of {VIEWS}.")


# An element as the pipeline fetches it: a class-folder Example, or a HaGRID record with its
# image bytes (prepared shards) or None (read the file at record.path).
Element = Example | tuple[HagridRecord, bytes | None]


def element_name(element: Element) -> str:
    """The file an element came from, for error messages."""
    return element.path if isinstance(element, Example) else element[0].path


def _decode(element: Element, draft_size: int) -> Image.Image:
    source = element.path if isinstance(element, Example) else (element[1] or element[0].path)
    # Bytes from a shard are named by the record's original file.
    return transforms.decode_rgb(source, draft_size=draft_size, name=element_name(element))


def _hand_crop(
    element: Element, view: ViewConfig, rng: np.random.Generator, train: bool
) -> tuple[Image.Image, int]:
    record = element[0]
    box, name = crops.pick_crop_target(record, rng, view.no_gesture_prob if train else 0.0)
    scale = crops.sample_crop_scale(rng, 1.0, view.crop_scale_max) if train else crops.EVAL_CROP_SCALE
    # The crop's side is >= max(w, h) * scale * the shorter image side, so decoding at this
    # draft size keeps the crop at full output resolution.
    draft = math.ceil(view.image_size / max(max(box[2], box[3]) * scale, 1e-3))
    img = _decode(element, draft)
    left, top, side = frames.hand_crop_box(box, *img.size, scale)
    return crops.crop_square(img, left, top, side, view.image_size), view.class_names.index(name)


def _label(element: Element, view: ViewConfig) -> int:
    if isinstance(element, Example):
        return element.label
    label = gesture_label(element[0], view.class_names)
    if label is None:  # sources drop these when scanning; reaching here is a bug, not bad data
        raise ValueError(f"{element_name(element)} has no gesture label in {view.class_names}.")
    return label


def train_view(
    element: Element, view: ViewConfig, rng: np.random.Generator
) -> tuple[np.ndarray, int, np.ndarray]:
    """Augmented (H, W, 3) uint8 pixels, the label and the colour jitter of one element: the jitter
    is drawn here and applied by the train step on the device (`device_jitter`)."""
    if view.mode == "hand_crop":
        img, label = _hand_crop(element, view, rng, train=True)
    else:
        # Decode at a reduced JPEG scale that still leaves the smallest crop at full resolution.
        draft = math.ceil(view.image_size / math.sqrt(view.crop_scale_min))
        img, label = _decode(element, draft), _label(element, view)
        if view.mode == "full_frame":
            img = crops.letterbox(img, draft)
        img = transforms.random_resized_crop(
            img, view.image_size, rng, scale=(view.crop_scale_min, 1.0)
        )
    if view.hflip:
        img = transforms.horizontal_flip(img, rng)
    jitter = transforms.sample_color_jitter(rng, view.brightness, view.contrast, view.saturation, view.hue)
    return transforms.pixels(img), label, jitter


def eval_view(element: Element, view: ViewConfig, seed: int) -> tuple[np.ndarray, int]:
    """Deterministic uint8 pixels and label; `seed` only picks among equal free hands."""
    if view.mode == "hand_crop":
        img, label = _hand_crop(element, view, np.random.default_rng(seed), train=False)
    elif view.mode == "full_frame":
        img = crops.letterbox(_decode(element, view.image_size), view.image_size)
        label = _label(element, view)
    else:
        img = _decode(element, math.ceil(view.image_size / EVAL_CROP_FRACTION))
        img = frames.resize_center_crop(img, view.image_size, EVAL_CROP_FRACTION)
        label = _label(element, view)
    return transforms.pixels(img), label



@dataclasses.dataclass(frozen=True)
class PredictView:
    """One input as the classifier sees it, and how much its view enlarged the image: a photo far
    smaller than the model's input (a thumbnail, a 1x1 pixel) is blown up into a blur."""

    pixels: np.ndarray
    enlargement: float  # model pixels per source pixel of the region shown (1.0: shown at its own size)
    source_size: tuple[int, int]  # (width, height) as decoded: the file's own size wherever it is enlarged
    mode: str  # the view it was seen in


def predict_view(path: str, mode: str, image_size: int, box: Box | None = None) -> PredictView:
    """uint8 pixels of one image file as evaluation sees it, without a label (for prediction):
    'original' (centre crop), 'full_frame' (letterbox) or 'hand_crop' (the square around `box`).
    JPEG drafts never decode the region shown below `image_size`, so the enlargement they report
    above 1 is the file's own."""
    if mode == "hand_crop":
        draft = math.ceil(image_size / max(max(box[2], box[3]) * crops.EVAL_CROP_SCALE, 1e-3))
        img = transforms.decode_rgb(path, draft_size=draft)
        left, top, side = frames.hand_crop_box(box, *img.size, crops.EVAL_CROP_SCALE)
        shown, out = side, crops.crop_square(img, left, top, side, image_size)
    elif mode == "full_frame":
        img = transforms.decode_rgb(path, draft_size=image_size)
        shown, out = max(img.size), crops.letterbox(img, image_size)
    else:
        img = transforms.decode_rgb(path, draft_size=math.ceil(image_size / EVAL_CROP_FRACTION))
        shown, out = min(img.size) * EVAL_CROP_FRACTION, frames.resize_center_crop(img, image_size, EVAL_CROP_FRACTION)
    return PredictView(transforms.pixels(out), image_size / shown, img.size, mode)
