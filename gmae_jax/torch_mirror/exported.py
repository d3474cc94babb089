"""Loads a folder written by the export stage and classifies images with torch, numpy and Pillow
only: no JAX, so a deployment installs nothing else.

    from gmae_jax.torch_mirror import exported
    model = exported.load("export_dir")
    probs = model.classify(["hand.jpg"])          # (N, num_classes) probabilities
    print(model.class_names[int(probs[0].argmax())])

Preprocessing follows the folder's `config.json` and reproduces the run's evaluation view ('original':
the central crop of the shorter side; 'full_frame': the letterboxed frame; 'hand_crop': the image
given as the hand's box, squared around it), bilinear, ImageNet mean / std.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from gmae_jax.data import frames
from gmae_jax.torch_mirror import export_format, modules

ImageLike = str | os.PathLike | bytes | Image.Image


def _rgb(image: ImageLike, draft_size: int) -> Image.Image:
    """An upright RGB image; transparent pixels on black, as gmae_jax's decoder does. A JPEG is decoded
    at a reduced scale, as gmae_jax decodes it, also when given as an `Image.open` not yet loaded (an
    image already decoded in full gives slightly other pixels)."""
    if not isinstance(image, Image.Image):
        data = image if isinstance(image, bytes) else open(image, "rb").read()
        try:
            image = Image.open(io.BytesIO(data))
        except Image.UnidentifiedImageError:  # its message names a BytesIO: the caller's file, by name
            what = "these bytes" if isinstance(image, bytes) else os.fspath(image)
            raise Image.UnidentifiedImageError(f"cannot identify an image in {what}") from None
    image.draft("RGB", (draft_size, draft_size))  # JPEG only, before its pixels are read: no-op otherwise
    image.load()
    return frames.to_rgb(ImageOps.exif_transpose(image))


def preprocess(image: ImageLike, preprocessing: dict[str, Any]) -> torch.Tensor:
    """(3, S, S) float32 in the run's evaluation view (`preprocessing['view']`; exports before it was
    recorded: 'original'): the central `crop_fraction` of the shorter side resized to S x S ('original'),
    the letterboxed frame ('full_frame'), or the whole image as the hand's box, squared around it (the
    longer side, centred, padded with `fill`) and resized to S x S ('hand_crop'); bilinear, scaled to
    [0, 1] and standardised with `mean` / `std`, channels RGB."""
    size, fraction = preprocessing["image_size"], preprocessing["crop_fraction"]
    view = preprocessing.get("view", "original")
    if view == "full_frame":
        img = frames.letterbox(_rgb(image, size), size, tuple(preprocessing["fill"]))
    elif view == "hand_crop":  # the image is the hand's box: squared around it as gmae_jax squares a box
        img = _rgb(image, size)
        img = frames.crop_square(img, *frames.hand_crop_box((0.0, 0.0, 1.0, 1.0), *img.size, 1.0), size,
                                 tuple(preprocessing["fill"]))
    else:
        img = frames.resize_center_crop(_rgb(image, math.ceil(size / fraction)), size, fraction)
    pixels = np.asarray(img, dtype=np.float32) / 255.0
    pixels = (pixels - np.asarray(preprocessing["mean"], np.float32)) / np.asarray(preprocessing["std"], np.float32)
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def _as_batch(images: ImageLike | Iterable[ImageLike]) -> list[ImageLike]:
    """One image as a batch of one (a path is a str, which would otherwise iterate by character)."""
    return [images] if isinstance(images, (str, os.PathLike, bytes, Image.Image)) else list(images)


@dataclasses.dataclass
class ExportedModel:
    """An exported model in eval mode, with its classes and preprocessing."""

    module: torch.nn.Module
    config: dict[str, Any]

    @property
    def class_names(self) -> list[str]:
        return self.config["class_names"]

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """(N, 3, S, S) model inputs; one image (a path, bytes or PIL image) is a batch of one."""
        return torch.stack([preprocess(image, self.config["preprocessing"]) for image in _as_batch(images)])

    @torch.no_grad()
    def classify(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64,
                 decode_threads: int | None = None) -> torch.Tensor:
        """Class probabilities (N, num_classes) on the CPU, in the order of `class_names`; one image gives
        N = 1. Images are decoded and run `batch_size` at a time, on the module's device and in its
        dtype (after `model.module.cuda()` or `.half()`), so a folder of photos never sits in memory whole.
        The next batch is decoded by `decode_threads` threads (default: one per core, at most 8; 0: in
        the caller's thread, one after the other) while the model runs the current one: Pillow decodes
        and resizes without holding the GIL."""
        images = _as_batch(images)
        if not len(images):
            raise ValueError("classify() needs at least one image")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if decode_threads is not None and decode_threads < 0:
            raise ValueError(f"decode_threads={decode_threads} must be 0 (no threads) or more")
        if not isinstance(self.module, modules.GMAEForClassification):
            raise TypeError(f"this export is a {self.config['stage']} model; only a fine-tuned one classifies")
        weights = next(self.module.parameters())
        threads = min(8, os.cpu_count() or 1) if decode_threads is None else decode_threads
        batches = [images[start:start + batch_size] for start in range(0, len(images), batch_size)]
        probabilities = []
        with _Decoder(threads, self.config["preprocessing"]) as decoder:
            upcoming = decoder.submit(batches[0])
            for index in range(len(batches)):
                pixels = decoder.result(upcoming)
                if index + 1 < len(batches):  # decoded while the model runs this batch
                    upcoming = decoder.submit(batches[index + 1])
                logits = self.module(pixels.to(weights.device, weights.dtype)).float()  # softmax in float32
                probabilities.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(probabilities)


class _Decoder:
    """Preprocesses batches of images in a thread pool (or, with no threads, when their result is asked
    for); on an error the batches not yet started are dropped."""

    def __init__(self, threads: int, preprocessing: dict[str, Any]):
        self._preprocessing = preprocessing
        self._pool = concurrent.futures.ThreadPoolExecutor(threads, "classify-decode") if threads else None

    def submit(self, images: Sequence[ImageLike]) -> list[Any]:
        if self._pool is None:
            return list(images)
        return [self._pool.submit(preprocess, image, self._preprocessing) for image in images]

    def result(self, submitted: list[Any]) -> torch.Tensor:
        if self._pool is None:
            return torch.stack([preprocess(image, self._preprocessing) for image in submitted])
        return torch.stack([future.result() for future in submitted])

    def __enter__(self) -> _Decoder:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def load(folder: str | os.PathLike) -> ExportedModel:
    """The model in `folder` (written by `configs/export.py`), weights loaded with `strict=True`."""
    finished = os.path.join(folder, export_format.CONFIG_JSON)
    if not os.path.isfile(finished):  # the export writes it last: model.pth may be an older export's
        raise FileNotFoundError(f"{finished} is missing: the export into {folder} did not finish (or the folder "
                                "holds no export), so its model.pth may be another step's; run the export again")
    checkpoint = torch.load(os.path.join(folder, export_format.MODEL_PTH), map_location="cpu", weights_only=True)
    config = checkpoint["config"]
    try:
        gmst = export_format.model_config(config)
    except ValueError as error:
        raise ValueError(f"{os.path.join(folder, export_format.MODEL_PTH)}: {error}; export the run again with "
                         "this version of gmae_jax") from None
    if config["stage"] == "finetune":
        module: torch.nn.Module = modules.GMAEForClassification(gmst, config["num_classes"])
    else:
        module = modules.GMAE(gmst)
    module.load_state_dict({**checkpoint["model_state_dict"], **checkpoint["extra_state_dict"]}, strict=True)
    return ExportedModel(module=module.eval(), config=config)

