"""The embedded demo dataset: drawn hand gestures written as real JPEGs in class folders.

It lets the demo and the tests run the real file pipeline with no download. Each class is a
HaGRID gesture name with its own set of extended fingers; skin tone, background clutter, pose,
size, blur, noise and JPEG quality vary per image. Every image has its own seed, so the output
does not depend on the order of writing or on the other classes.
"""

from collections.abc import Sequence
import inspect
import json
import math
from typing import Any
import zlib

from etils import epath
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from gmae_jax.data.class_folders import DataLayoutError

DEMO_CLASSES = ("fist", "one", "peace", "three", "four", "palm", "like", "rock")
SPLITS = ("train", "val")
MARKER = ".complete"
WRITING = ".writing"  # there while a write is under way: a folder with it holds a killed write
FRAMINGS = ("scene", "hand_crop")
_FORMAT_VERSION = 1  # Bump when the drawing changes, so ensure_demo_dataset redraws.

# Extended fingers (thumb, index, middle, ring, pinky) and the spread of the extended ones
# in degrees, positive towards the thumb. Folded fingers show as knuckles.
_GESTURES = {
    "fist": ((0, 0, 0, 0, 0), (0, 0, 0, 0, 0)),
    "one": ((0, 1, 0, 0, 0), (0, 2, 0, 0, 0)),
    "peace": ((0, 1, 1, 0, 0), (0, 16, -10, 0, 0)),
    "three": ((1, 1, 1, 0, 0), (50, 12, -4, 0, 0)),
    "four": ((0, 1, 1, 1, 1), (0, 14, 3, -7, -18)),
    "palm": ((1, 1, 1, 1, 1), (55, 14, 3, -7, -18)),
    "like": ((1, 0, 0, 0, 0), (90, 0, 0, 0, 0)),
    "rock": ((0, 1, 0, 0, 1), (0, 8, 0, 0, -14)),
}
# "like" is a fist turned on its side with the thumb up: rotate the hand, keep the arm down.
_SIDEWAYS = frozenset({"like"})

# Hand frame: y up, palm centre at the origin, palm bottom to middle fingertip ~0.9 units.
_PALM_AXES = (0.22, 0.26)
_FINGER_X = (-0.15, -0.05, 0.05, 0.15)  # index, middle, ring, pinky
_FINGER_BASE_Y = 0.16
_FINGER_LENGTH = (0.40, 0.45, 0.41, 0.31)
_FINGER_WIDTH = 0.115
_THUMB_BASE = (-0.17, -0.04)
_THUMB_LENGTH = 0.33
_ARM_WIDTH = 0.34
_HAND_EXTENT = 0.9
_HAND_MIDDLE = np.array([0.0, 0.18])  # Placed at the drawn centre, so the fingers stay in view.
_SUPERSAMPLE = 2


def _direction(angle_deg: float) -> np.ndarray:
    """Unit vector at angle_deg from straight up, positive towards the thumb (-x)."""
    a = math.radians(angle_deg)
    return np.array([-math.sin(a), math.cos(a)])


def _rotation(angle: float) -> np.ndarray:
    """Counter-clockwise rotation by angle radians (y up)."""
    cos, sin = math.cos(angle), math.sin(angle)
    return np.array([[cos, -sin], [sin, cos]])


def _hand_strokes(name: str, rng: np.random.Generator) -> tuple[list, np.ndarray]:
    """Thick strokes (start, end, width) in the hand frame, and the palm outline."""
    extended, spread = _GESTURES[name]
    jitter = rng.uniform(-4, 4, size=5)
    strokes = []
    for i, (x, length) in enumerate(zip(_FINGER_X, _FINGER_LENGTH), start=1):
        base = np.array([x, _FINGER_BASE_Y])
        if extended[i]:
            tip = base + length * _direction(spread[i] + jitter[i])
        else:  # A knuckle bump on top of the palm.
            base, tip = base - [0, 0.05], base + [0, 0.06]
        strokes.append((base, tip, _FINGER_WIDTH))
    thumb_base = np.array(_THUMB_BASE)
    if extended[0]:
        thumb_tip = thumb_base + _THUMB_LENGTH * _direction(spread[0] + jitter[0])
    else:  # Folded across the palm, in front of the folded fingers.
        thumb_base, thumb_tip = thumb_base + [-0.03, 0.0], np.array([0.03, 0.11])
    strokes.append((thumb_base, thumb_tip, _FINGER_WIDTH * 1.15))
    t = np.linspace(0, 2 * math.pi, 32, endpoint=False)
    palm = np.stack([_PALM_AXES[0] * np.cos(t), _PALM_AXES[1] * np.sin(t)], axis=1)
    return strokes, palm


def _background(size: int, rng: np.random.Generator) -> Image.Image:
    """A two-colour gradient with a few random shapes as clutter."""
    c0, c1 = rng.integers(0, 256, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    coords = np.arange(size, dtype=np.float32) / size
    t = (coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle) + 1.5) / 3
    pixels = c0.astype(np.float32) + t[..., None] * (c1 - c0).astype(np.float32)
    img = Image.fromarray(pixels.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(2, 7)):
        x0, y0 = rng.uniform(-0.2, 1.0, size=2) * size
        w, h = rng.uniform(0.1, 0.45, size=2) * size
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        shape = (x0, y0, x0 + w, y0 + h)
        if rng.random() < 0.5:
            draw.rectangle(shape, fill=colour)
        else:
            draw.ellipse(shape, fill=colour)
    return img


def _skin_tone(rng: np.random.Generator) -> np.ndarray:
    light, dark = np.array([250, 215, 185]), np.array([95, 60, 40])
    return np.clip(light + rng.uniform() * (dark - light) + rng.normal(0, 8, 3), 0, 255)


def _draw_hand(img: Image.Image, name: str, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """Draws the gesture with random skin tone, size, position, rotation and handedness; returns the
    hand's box (left, top, right, bottom) in pixels, without the arm, as HaGRID's boxes are."""
    size = img.size[0]
    scale = rng.uniform(0.4, 0.8) * size / _HAND_EXTENT
    pose = math.radians(-90 if name in _SIDEWAYS else 0)
    rotation = _rotation(pose + math.radians(rng.uniform(-25, 25)))
    mirror = rng.choice([-1.0, 1.0])  # Left or right hand.
    margin = 0.45 * scale
    centre = rng.uniform(margin, size - margin, size=2)

    def to_image(points: np.ndarray) -> list[tuple[float, float]]:
        p = (np.atleast_2d(points) - _HAND_MIDDLE) @ rotation.T * scale
        return [(float(centre[0] + mirror * x), float(centre[1] - y)) for x, y in p]

    skin = _skin_tone(rng)
    fill = tuple(int(c) for c in skin)
    edge = tuple(int(c) for c in skin * 0.65)
    draw = ImageDraw.Draw(img)

    def stroke(start: np.ndarray, end: np.ndarray, width: float, border: float) -> None:
        (x0, y0), (x1, y1) = to_image(np.stack([start, end]))
        for colour, w in ((edge, width * scale + 2 * border), (fill, width * scale)):
            r = w / 2
            draw.line([(x0, y0), (x1, y1)], fill=colour, width=max(1, round(w)))
            for x, y in ((x0, y0), (x1, y1)):
                draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)

    border = max(1.0, 0.012 * scale)
    # The arm leaves the palm downwards, also for the sideways "like": undo the pose.
    arm = _rotation(-pose) @ np.array([0.0, -1.0])
    stroke(arm * 0.2, arm * 1.6, _ARM_WIDTH, border)
    strokes, palm = _hand_strokes(name, rng)
    draw.polygon(to_image(palm), fill=fill, outline=edge, width=round(border))
    for start, end, width in strokes:
        stroke(start, end, width, border)
    outline = np.array(to_image(np.concatenate([palm, *[[start, end] for start, end, _ in strokes]])))
    pad = _FINGER_WIDTH * scale / 2 + border
    (left, top), (right, bottom) = outline.min(0) - pad, outline.max(0) + pad
    return float(left), float(top), float(right), float(bottom)


def _hand_crop(canvas: Image.Image, box: tuple[float, float, float, float], image_size: int,
               rng: np.random.Generator) -> Image.Image:
    """A square of side max(w, h) x U(1.1, 1.5) around the hand, as HaGRID v1's hand-crop view;
    black where it leaves the frame, as the HaGRID loader pads."""
    left, top, right, bottom = box
    side = max(right - left, bottom - top) * rng.uniform(1.1, 1.5)
    cx, cy = (left + right) / 2, (top + bottom) / 2
    square = tuple(round(v) for v in (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2))
    return canvas.crop(square).resize((image_size, image_size), Image.Resampling.BOX)


def _render(name: str, image_size: int, rng: np.random.Generator, framing: str = "scene") -> Image.Image:
    """Draws at a larger size and reduces, which anti-aliases the edges cheaply."""
    supersample = _SUPERSAMPLE if framing == "scene" else 2 * _SUPERSAMPLE  # crops keep the detail
    canvas = _background(image_size * supersample, rng)
    box = _draw_hand(canvas, name, rng)
    img = canvas.reduce(supersample) if framing == "scene" else _hand_crop(canvas, box, image_size, rng)
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.8)))
    noise = rng.normal(0, rng.uniform(0, 6), size=(image_size, image_size, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8))


def _image_rng(seed: int, split: str, name: str, index: int) -> np.random.Generator:
    keys = [zlib.crc32(k.encode()) for k in (split, name)]
    return np.random.default_rng([seed, *keys, index])


def write_demo_dataset(
    root: str,
    *,
    image_size: int = 64,
    train_per_class: int,
    val_per_class: int,
    seed: int = 0,
    classes: Sequence[str] = DEMO_CLASSES,
    framing: str = "scene",
) -> dict[str, int]:
    """Writes `<root>/{train,val}/<class>/<index>.jpg`; returns the number of images per split.

    framing: 'scene' (a hand somewhere in a cluttered frame, as a full-frame photo) or 'hand_crop'
    (the square around the hand, as HaGRID v1's classification view)."""
    if framing not in FRAMINGS:
        raise ValueError(f"framing={framing!r}; choose from {FRAMINGS}")
    unknown = sorted(set(classes) - set(_GESTURES))
    if unknown:
        raise ValueError(f"No drawing for classes {unknown}; choose from {sorted(_GESTURES)}.")
    counts = {}
    for split, per_class in zip(SPLITS, (train_per_class, val_per_class)):
        for name in classes:
            folder = epath.Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                rng = _image_rng(seed, split, name, index)
                img = _render(name, image_size, rng, framing)
                with (folder / f"{index:05d}.jpg").open("wb") as f:
                    img.save(f, "JPEG", quality=int(rng.integers(75, 96)))
        counts[split] = per_class * len(classes)
    return counts


def _demo_params(root: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """`write_demo_dataset`'s arguments with their defaults, as the marker records them."""
    bound = inspect.signature(write_demo_dataset).bind(root, **kwargs)
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k != "root"}
    params["classes"] = list(params["classes"])  # As JSON reads it back.
    return {"format_version": _FORMAT_VERSION, **params}


def demo_dataset_changes(root: str, **kwargs: Any) -> list[str]:
    """How the demo dataset in `root` differs from what `ensure_demo_dataset(root, **kwargs)` would
    draw ('name: old -> new'); empty where nothing complete is there yet or nothing differs."""
    marker = epath.Path(root) / MARKER
    if not marker.exists():
        return []
    old, new = json.loads(marker.read_text())["params"], _demo_params(root, kwargs)
    return [f"{name}: {old.get(name)!r} -> {new.get(name)!r}" for name in sorted(set(old) | set(new))
            if old.get(name) != new.get(name)]


def ensure_demo_dataset(root: str, **kwargs: Any) -> dict[str, int]:
    """Writes the demo dataset unless `<root>/.complete` records the same parameters.

    Takes `write_demo_dataset`'s keyword arguments. `.complete` is written last, so a write that
    was killed part-way (`.writing` still there) is redone; a change of parameters deletes the old
    splits first so no stale images stay behind. Split folders that no demo wrote (neither marker
    there) are someone's data: refused, never deleted.
    """
    params = _demo_params(root, kwargs)
    write_kwargs = {k: v for k, v in params.items() if k != "format_version"}
    root_path = epath.Path(root)
    marker, writing = root_path / MARKER, root_path / WRITING
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded["params"] == params:
            return recorded["counts"]
    elif not writing.exists():
        foreign = [str(root_path / split) for split in SPLITS
                   if (root_path / split).exists() and any((root_path / split).iterdir())]
        if foreign:
            verb = "hold" if len(foreign) > 1 else "holds"
            raise DataLayoutError(
                f"{' and '.join(foreign)} {verb} files the demo did not write, and the demo draws its images "
                f"there ({root}): move them elsewhere, or give the demo another --workdir")
    root_path.mkdir(parents=True, exist_ok=True)
    writing.write_text(json.dumps(params))
    if marker.exists():
        marker.unlink()
    for split in SPLITS:
        if (root_path / split).exists():
            (root_path / split).rmtree()
    counts = write_demo_dataset(root, **write_kwargs)
    marker.write_text(json.dumps({"params": params, "counts": counts}, indent=2))
    writing.unlink()
    return counts
