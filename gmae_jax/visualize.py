"""Pictures a person would rather look at than numbers: reconstructions, a confusion matrix, predictions."""

from __future__ import annotations

import functools
import os
import unicodedata
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from gmae_jax import run_files
from gmae_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gmae_jax.models.masking import patchify, unpatchify


def save_png(image: Image.Image, path: str | epath.Path) -> None:
    """Written whole (a kill mid-write leaves the old picture or the new one, never a cut one), through
    epath, so a gs:// workdir works on TPU VMs."""
    run_files.write_whole(path, lambda f: image.save(f, format="PNG"))


def to_uint8(images: np.ndarray) -> np.ndarray:
    """ImageNet-normalised float images -> uint8 RGB."""
    pixels = images * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(pixels * 255.0 + 0.5, 0, 255).astype(np.uint8)


def reconstruction_rows(
    images: np.ndarray, mask: np.ndarray, pred: np.ndarray, patch_size: int, norm_pix_loss: bool
) -> np.ndarray:
    """(N, 4, H, W, 3) float images: original | masked input | reconstruction (every patch as
    predicted) | reconstruction with the visible patches pasted back. Per-patch normalised
    predictions are mapped back with the original patch stats."""
    target = np.asarray(patchify(images, patch_size))
    pred = np.asarray(pred)
    if norm_pix_loss:
        mean = target.mean(-1, keepdims=True)
        std = np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)  # the loss's unbiased variance
        pred = pred * std + mean
    masked_patches = mask[..., None]
    masked_input = np.asarray(unpatchify(np.where(masked_patches, 0.0, target), patch_size))
    predicted = np.asarray(unpatchify(pred, patch_size))
    pasted = np.asarray(unpatchify(np.where(masked_patches, pred, target), patch_size))
    return np.stack([images, masked_input, predicted, pasted], axis=1)


RECONSTRUCTION_COLUMNS = ("original", "masked input", "reconstruction", "visible pasted back")
_TEXT_ROW = 16  # px: a line of PIL's default font with a margin


def save_reconstructions(rows: np.ndarray, path: str, caption: str = "") -> None:
    """Writes a grid with one example per row and one column per picture of `reconstruction_rows`,
    each column named above it and `caption` (what the picture shows: step, mask ratio) below.
    Small images are upscaled (up to 4x, to about 128-256 px) so that patches can be told apart."""
    n, cols, h, w, _ = rows.shape
    tiles = to_uint8(rows)
    pad = 2
    grid = np.full((n * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(n):
        for j in range(cols):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = tiles[i, j]
    scale = max(1, min(4, 256 // max(h, w)))
    grid_image = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    font = _font()
    caption_lines = _wrap(ImageDraw.Draw(grid_image), caption, grid_image.width - 8, font)
    image = Image.new("RGB", (grid_image.width, grid_image.height + (1 + len(caption_lines)) * _TEXT_ROW), "white")
    image.paste(grid_image, (0, _TEXT_ROW))
    draw = ImageDraw.Draw(image)
    column_width = (w + pad) * scale
    for j, name in enumerate(RECONSTRUCTION_COLUMNS[:cols]):
        draw.text((pad * scale + j * column_width, 2), _fit(draw, name, column_width - 4, font), fill="black",
                  font=font)
    for k, line in enumerate(caption_lines):
        draw.text((pad * scale, _TEXT_ROW + grid_image.height + k * _TEXT_ROW + 2), line, fill="black", font=font)
    save_png(image, path)


def save_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str], path: str, cell: int = 36,
                          step: int | None = None) -> None:
    """Row-normalised heat map with counts; rows are true classes, columns predictions; the footer
    names the checkpoint `step` the counts are of."""
    font = _font()
    n = len(class_names)
    margin = 8 + 7 * max(len(name) for name in class_names)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    footer = f"{'' if step is None else f'step {step}: '}rows: true class, columns: predicted; accuracy {accuracy:.3f}"
    width = max(margin + n * cell + 8, 8 + int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(footer, font=font)))
    height = margin + n * cell + 24
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    rows = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        draw.text((4, margin + i * cell + cell // 3), class_names[i], fill="black", font=font)
        for j in range(n):
            shade = int(255 * (1.0 - rows[i, j]))
            x, y = margin + j * cell, margin + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline="grey")
            colour = "white" if rows[i, j] > 0.5 else "black"
            draw.text((x + 4, y + cell // 3), str(matrix[i, j]), fill=colour, font=font)
    for j, name in enumerate(class_names):
        column = Image.new("RGB", (margin - 4, 12), "white")
        ImageDraw.Draw(column).text((0, 0), name, fill="black", font=font)
        column = column.rotate(90, expand=True)
        image.paste(column, (margin + j * cell + cell // 3, 2))
    draw.text((4, height - 18), footer, fill="black", font=font)
    save_png(image, path)


def save_prediction_sheet(images: Sequence[np.ndarray], captions: Sequence[Sequence[str]],
                          correct: Sequence[bool | None], path: str, tile: int = 128, columns: int = 6,
                          title: str = "") -> None:
    """Each input as the classifier saw it (uint8 RGB, upscaled to `tile`), with caption lines below;
    a green frame where the top class matches the input's annotation, red where it does not, none
    where the input has no annotation. `title`, if any, in lines above the sheet."""
    font = _font()
    line_height, pad = 12, 6
    caption_height = line_height * max((len(lines) for lines in captions), default=1) + 4
    columns = max(1, min(columns, len(images)))
    rows = (len(images) + columns - 1) // columns
    cell_w, cell_h = tile + 2 * pad, tile + 2 * pad + caption_height
    title_lines = _wrap(ImageDraw.Draw(Image.new("RGB", (1, 1))), title, columns * cell_w - 2 * pad, font)
    top = len(title_lines) * _TEXT_ROW
    sheet = Image.new("RGB", (columns * cell_w, top + max(rows, 1) * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(title_lines):
        draw.text((pad, k * _TEXT_ROW + 2), line, fill="black", font=font)
    for k, (pixels, lines, ok) in enumerate(zip(images, captions, correct)):
        x, y = (k % columns) * cell_w + pad, top + (k // columns) * cell_h + pad
        sheet.paste(Image.fromarray(np.asarray(pixels, np.uint8)).resize((tile, tile), Image.NEAREST), (x, y))
        if ok is not None:
            draw.rectangle([x - 3, y - 3, x + tile + 2, y + tile + 2], outline=(0, 150, 0) if ok else (200, 0, 0),
                           width=3)
        for i, line in enumerate(lines):
            draw.text((x, y + tile + 4 + i * line_height), _fit(draw, line, tile, font), fill="black", font=font)
    save_png(sheet, path)


def file_label(path: str) -> str:
    """A file as a caption names it: its folder and name (class folders repeat names like 00000.jpg)."""
    folder, name = os.path.split(os.path.normpath(path))
    return f"{os.path.basename(folder)}/{name}" if os.path.basename(folder) else name


@functools.cache
def _font() -> ImageFont.ImageFont:
    """DejaVu Sans where the system has it, so that class names (folder names) in Cyrillic, Greek and other
    scripts it covers are drawn, not boxes (it has no CJK); else PIL's default font (Latin only) at the same
    size."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", 10)
    except OSError:
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> list[str]:
    """`text` in lines of whole words that fit `width` pixels (a word wider than that is cut)."""
    lines: list[str] = []
    for word in _one_line(text).split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(_fit(draw, word, width, font))
    return lines


def _one_line(text: str) -> str:
    """`text` with control characters (a file name may hold a newline, which PIL cannot measure on one
    line) and line separators escaped; other scripts' joiners and spaces stay."""
    return "".join(repr(char)[1:-1] if unicodedata.category(char) == "Cc" or char in "\u2028\u2029" else char
                   for char in text)


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font: ImageFont.ImageFont) -> str:
    """`text` on one line (`_one_line`), cut (with '...') to fit `width` pixels."""
    text = _one_line(text)
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."
