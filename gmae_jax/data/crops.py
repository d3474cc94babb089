"""Hand crops and letterboxed full frames: pure geometry on RGB PIL images.

Padding uses the ImageNet mean colour: `transforms.normalize` maps it to ~0, so padded
pixels look like "no signal" to the encoder instead of a black frame it must learn to ignore.
"""

from collections.abc import Sequence

import numpy as np
from PIL import Image

from gmae_jax.data import frames
from gmae_jax.data.hagrid import Box, HagridRecord
from gmae_jax.data.hagrid_layout import NO_GESTURE, TWO_HANDED
from gmae_jax.data.transforms import IMAGENET_MEAN

FILL = tuple(int(round(255 * m)) for m in IMAGENET_MEAN)
EVAL_CROP_SCALE = 1.0  # evaluation crops are exactly the (squared) box


def crop_square(
    img: Image.Image, left: int, top: int, side: int, out_size: int, fill: tuple[int, ...] = FILL
) -> Image.Image:
    """`frames.crop_square`, padded with the ImageNet mean colour by default."""
    return frames.crop_square(img, left, top, side, out_size, fill)


def letterbox(img: Image.Image, out_size: int, fill: tuple[int, ...] = FILL) -> Image.Image:
    """Full-frame view: longest side resized to out_size, centred on a square of `fill`."""
    return frames.letterbox(img, out_size, fill)


def sample_crop_scale(rng: np.random.Generator, low: float, high: float) -> float:
    """Training scale jitter s ~ U(low, high): the hand with a varying amount of context."""
    return float(rng.uniform(low, high))


def _union(boxes: Sequence[Box]) -> Box:
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    return x0, y0, x1 - x0, y1 - y0


def _gesture(record: HagridRecord) -> str | None:
    return next((label for label in record.labels if label != NO_GESTURE), None)


def gesture_box(record: HagridRecord) -> Box:
    """The box to crop for the record's gesture.

    Two-handed gestures use `united_box` (both hands), or the union of their hands' boxes
    when it is absent; a record with only no_gesture hands gives its first hand.
    """
    gesture = _gesture(record)
    if gesture is None:
        return record.boxes[0]
    if gesture in TWO_HANDED:
        if record.united_box is not None:
            return record.united_box
        return _union([b for b, l in zip(record.boxes, record.labels) if l == gesture])
    return record.boxes[record.labels.index(gesture)]


def pick_crop_target(
    record: HagridRecord, rng: np.random.Generator, no_gesture_prob: float
) -> tuple[Box, str]:
    """(box, label name) to crop: a free no_gesture hand with probability no_gesture_prob.

    Records without a gesture always give a no_gesture hand; records without a free hand
    always give the gesture. Pass no_gesture_prob=0 at evaluation.
    """
    free = [b for b, label in zip(record.boxes, record.labels) if label == NO_GESTURE]
    gesture = _gesture(record)
    if free and (gesture is None or rng.random() < no_gesture_prob):
        return free[int(rng.integers(len(free)))], NO_GESTURE
    return gesture_box(record), gesture
