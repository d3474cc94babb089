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
    def classify(self, images: ImageLike | Iterable[ImageLike], batch_size: int = 64) -> torch.Tensor:
        """Class probabilities (N, num_classes) on the CPU, in the order of `class_names`; one image gives
        N = 1. Images are decoded and run `batch_size` at a time, on the module's device and in its
        dtype (after `model.module.cuda()` or `.half()`), so a folder of photos never sits in memory whole."""
        images = _as_batch(images)
        if not len(images):
            raise ValueError("classify() needs at least one image")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        if not isinstance(self.module, modules.GMAEForClassification):
            raise TypeError(f"this export is a {self.config['stage']} model; only a fine-tuned one classifies")
        weights = next(self.module.parameters())
        probabilities = []
        for start in range(0, len(images), batch_size):
            inputs = self.preprocess(images[start:start + batch_size]).to(weights.device, weights.dtype)
            logits = self.module(inputs).float()  # softmax in float32 whatever the module's dtype
            probabilities.append(torch.softmax(logits, dim=-1).cpu())
        return torch.cat(probabilities)


def load(folder: str | os.PathLike) -> ExportedModel:
    """The model in `folder` (written by `configs/export.py`), weights loaded with `strict=True`."""
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

