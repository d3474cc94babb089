"""What a label-efficiency study's runs add up to: per (init, labels) mean / min / max over seeds,
a text table and a PIL plot (accuracy vs labels per class, one curve and min-max band per init)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from gmae_jax import visualize

ALL = "all"  # labels_per_class of a run on every labelled training image
INIT_ORDER = ("scratch", "pretrained", "linear_probe")
_COLOURS = {"scratch": (214, 96, 77), "pretrained": (33, 102, 172), "linear_probe": (90, 160, 90)}


def labels_name(per_class: int) -> int | str:
    """How a labels_per_class value is written in results: the count, or 'all' for 0."""
    return per_class if per_class > 0 else ALL


def _order(runs: Sequence[dict[str, Any]]) -> tuple[list, list]:
    labels = sorted({r["labels_per_class"] for r in runs}, key=lambda v: (v == ALL, v if v != ALL else 0))
    inits = [i for i in INIT_ORDER if any(r["init"] == i for r in runs)]
    inits += sorted({r["init"] for r in runs} - set(inits))
    return labels, inits


def summarize(runs: Sequence[dict[str, Any]],
              metrics: Sequence[str] = ("accuracy", "macro_f1")) -> list[dict[str, Any]]:
    """One row per (init, labels_per_class): the number of seeds and each metric's mean, min, max."""
    labels, inits = _order(runs)
    rows = []
    for init in inits:
        for per_class in labels:
            group = [r for r in runs if r["init"] == init and r["labels_per_class"] == per_class]
            if not group:
                continue
            row: dict[str, Any] = {"init": init, "labels_per_class": per_class, "seeds": len(group)}
            for metric in metrics:
                values = np.asarray([r[metric] for r in group], np.float64)
                row |= {f"{metric}_mean": float(values.mean()), f"{metric}_min": float(values.min()),
                        f"{metric}_max": float(values.max())}
            rows.append(row)
    return rows


def table(summary: Sequence[dict[str, Any]], metric: str = "accuracy") -> str:
    """A markdown table: labels per class down, inits across, 'mean (min-max)' over the seeds."""
    labels, inits = _order(summary)
    cells = {(r["init"], r["labels_per_class"]): r for r in summary}
    lines = [f"| labels / class | {' | '.join(inits)} |", "|---|" + "---:|" * len(inits)]
    for per_class in labels:
        row = []
        for init in inits:
            r = cells.get((init, per_class))
            row.append("" if r is None else f"{r[f'{metric}_mean']:.3f} ({r[f'{metric}_min']:.3f}-"
                                            f"{r[f'{metric}_max']:.3f}, n={r['seeds']})")
        lines.append(f"| {per_class} | {' | '.join(row)} |")
    return "\n".join(lines)


def save_plot(summary: Sequence[dict[str, Any]], path: str, chance: float, title: str = "",
              train_images: int | None = None) -> None:
    """Accuracy vs labels per class (equally spaced categories): each init's mean as a line and its
    min-max over seeds as a translucent band, chance as a dashed line. The axis says how many images
    'all' is (`train_images`, the labelled training split)."""
    font = ImageFont.load_default()
    labels, inits = _order(summary)
    width, height, left, right, top, bottom = 640, 420, 60, 150, 30, 50
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    values = [chance] + [r[k] for r in summary for k in ("accuracy_min", "accuracy_max")]
    low = max(0.0, np.floor(min(values) * 10) / 10)
    high = min(1.0, np.ceil(max(values) * 10) / 10)
    high = high if high > low else low + 0.1
    plot_w, plot_h = width - left - right, height - top - bottom

    def x_of(i: int) -> float:
        return left + (plot_w * (i + 0.5) / len(labels))

    def y_of(v: float) -> float:
        return top + plot_h * (high - v) / (high - low)

    for tick in np.arange(low, high + 1e-9, 0.1):
        y = y_of(tick)
        draw.line([(left, y), (left + plot_w, y)], fill=(225, 225, 225))
        draw.text((left - 34, y - 6), f"{tick:.1f}", fill="black", font=font)
    for i, per_class in enumerate(labels):
        draw.text((x_of(i) - 8, top + plot_h + 8), str(per_class), fill="black", font=font)
    axis = "labels per class"
    if ALL in labels and train_images is not None:
        axis += f" (all: the {train_images} labelled training images)"
    draw.text((left + plot_w // 2 - 3 * len(axis), height - 22), axis, fill="black", font=font)
    draw.text((8, 8), title or "validation accuracy (mean, min-max over seeds)", fill="black", font=font)
    for x in range(left, left + plot_w, 10):
        draw.line([(x, y_of(chance)), (x + 5, y_of(chance))], fill=(120, 120, 120))
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")

    # The min-max bands first, translucent, so the mean lines and points stay on top.
    curves = []
    bands = Image.new("RGBA", image.size, (0, 0, 0, 0))
    band_draw = ImageDraw.Draw(bands)
    for init in inits:
        colour = _COLOURS.get(init, (100, 100, 100))
        rows = {r["labels_per_class"]: r for r in summary if r["init"] == init}
        points = [(i, rows[p]) for i, p in enumerate(labels) if p in rows]
        upper = [(x_of(i), y_of(r["accuracy_max"])) for i, r in points]
        lower = [(x_of(i), y_of(r["accuracy_min"])) for i, r in reversed(points)]
        if len(points) > 1:
            band_draw.polygon(upper + lower, fill=colour + (60,))
        else:
            band_draw.rectangle([upper[0][0] - 6, upper[0][1], lower[0][0] + 6, lower[0][1]], fill=colour + (60,))
        curves.append((init, colour, [(x_of(i), y_of(r["accuracy_mean"])) for i, r in points]))
    image = Image.alpha_composite(image.convert("RGBA"), bands).convert("RGB")
    draw = ImageDraw.Draw(image)
    legend_x, legend_y = left + plot_w + 12, top + 10
    for k, (init, colour, means) in enumerate(curves):
        if len(means) > 1:
            draw.line(means, fill=colour, width=3)
        for x, y in means:
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        draw.line([(legend_x, legend_y + 18 * k), (legend_x + 20, legend_y + 18 * k)], fill=colour, width=3)
        draw.text((legend_x + 26, legend_y - 6 + 18 * k), init, fill="black", font=font)
    k = len(curves)
    draw.line([(legend_x, legend_y + 18 * k), (legend_x + 20, legend_y + 18 * k)], fill=(120, 120, 120))
    draw.text((legend_x + 26, legend_y - 6 + 18 * k), f"chance {chance:.2f}", fill="black", font=font)
    visualize.save_png(image, path)
