"""The predict stage: a fine-tuned classifier's top-k classes for images (configs/predict.py).

Writes `predictions.csv` and `predictions.jsonl` (one row per input: file, annotated gesture if the
input is a HaGRID tree or a folder named as a class, top-k classes with probabilities, the run and
checkpoint step that predicted it), `predictions.png` (the first inputs as
the classifier saw them, with their top class; framed green or red against an annotation) and
`skipped.csv` (file, reason) for every file that is not an image or does not decode; none of these
stops the run.
"""

from __future__ import annotations

import concurrent.futures
import csv
import io
import json
from typing import Any

import jax
import ml_collections
import numpy as np
import tqdm
from absl import logging
from etils import epath

from gmae_jax import config_checks, config_lib, host_resources, run_files, visualize
from gmae_jax.data import inputs, transforms, views
from gmae_jax.train import evaluation, resume_check, run_folder, setup, sharding, steps

ONE_PROCESS = True  # on one host's devices

VIEWS = ("auto",) + views.VIEWS  # auto: the view the run was evaluated on


def validate(config: ml_collections.ConfigDict) -> None:
    setup.validate_run_reference(config, runs="a finetune run")
    config_checks.check(bool(config.inputs), "config.inputs is empty; set --config.inputs=an image, a folder or a "
                        "HaGRID tree")
    config_checks.check(config.view in VIEWS, f"config.view='{config.view}' must be one of {VIEWS}")
    config_checks.check(config.top_k >= 1, f"config.top_k={config.top_k} must be at least 1")
    config_checks.check(config.batch_size > 0, f"config.batch_size={config.batch_size} must be positive")
    config_checks.check_num_workers(config.num_workers, "num_workers")


def _view(config: ml_collections.ConfigDict, item: inputs.Input, trained: str | None) -> str:
    """The view of one input: config.view, or ('auto') the one the run was evaluated with, so that a
    photo looks as the model's images did (a hand crop needs the input's box: without one, the
    centre crop); runs older than that record crop HaGRID inputs to their box."""
    if config.view != "auto":
        return config.view
    if trained in ("original", "full_frame"):
        return trained
    return "hand_crop" if item.box is not None else "original"


def _load(item: inputs.Input, view: str, image_size: int) -> views.PredictView | str:
    """One input as the classifier sees it, or why it cannot be read."""
    try:
        return views.predict_view(item.path, view, image_size, item.box)
    except transforms.ImageDecodeError as error:
        return f"unreadable: {error}"


def _printable(text: str) -> str:
    """A file or class name, or a reason that quotes one, as text: bytes that are not UTF-8 (Python keeps them
    as surrogates, which no UTF-8 file or JSON takes) as \\xNN."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


OUTPUTS = ("predictions.csv", "predictions.jsonl", "predictions.png", "skipped.csv")
SHEET_SIZE = 36  # inputs drawn in predictions.png
# Inputs the view enlarges more than this: a prediction on a blur of a few source pixels means little.
MAX_ENLARGEMENT = 4.0
MIN_CENTRE_CROP_SHARE = 0.25  # a centre crop that shows less of the image than this is warned of (~3:1 and flatter)


def _csv(rows: list[list[str]]) -> str:
    text = io.StringIO()
    csv.writer(text).writerows(rows)
    return text.getvalue()


def _draw(sheet: list[tuple[np.ndarray, dict]], path: str) -> None:
    """The first inputs with file name, top class and probability, and the annotation where there is one."""
    captions, correct = [], []
    for _, row in sheet:
        best = row["top_k"][0]
        lines = [visualize.file_label(row["file"]), f"{best['class']} {best['prob']:.2f}"]
        if row["annotation"]:
            lines.append(f"annotated: {row['annotation']}")
        captions.append(lines)
        correct.append(best["class"] == row["annotation"] if row["annotation"] else None)
    visualize.save_prediction_sheet([pixels for pixels, _ in sheet], captions, correct, path)


def _write(workdir: epath.Path, rows: list[dict], skipped: list[tuple[str, str]], top_k: int,
           checkpoint: dict[str, Any]) -> None:
    """The three outputs, each written whole (a kill leaves the old file or the new one); each row and JSON
    line also names the `checkpoint` (run folder and step) that predicted it: a file alone says which."""
    workdir.mkdir(parents=True, exist_ok=True)
    # Class names are folder names too (a run trained on class folders).
    rows = [{**row, "file": _printable(row["file"]), "annotation": _printable(row["annotation"]),
             "top_k": [{**entry, "class": _printable(entry["class"])} for entry in row["top_k"]]} for row in rows]
    skipped = [(_printable(name), _printable(reason)) for name, reason in skipped]
    header = (["file", "annotation"] + [f"{name}_{i}" for i in range(1, top_k + 1) for name in ("class", "prob")]
              + ["run", "step"])
    table = [header] + [[row["file"], row["annotation"]] + [
        value for entry in row["top_k"] for value in (entry["class"], f"{entry['prob']:.6f}")]
        + [_printable(str(checkpoint["run"])), str(checkpoint["step"])] for row in rows]
    run_files.write_text(workdir / "predictions.csv", _csv(table))
    run_files.write_text(workdir / "predictions.jsonl", "".join(json.dumps({**row, **checkpoint}) + "\n"
                                                                for row in rows))
    run_files.write_text(workdir / "skipped.csv", _csv([["file", "reason"], *skipped]))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, int]:
    """Predicts every input; returns counts of predicted and skipped files."""
    stage = run_folder.load_run_config(run_folder.run_workdir(config.checkpoint_dir)).stage
    if stage != "finetune":
        raise config_lib.ConfigError(f"config.checkpoint_dir={config.checkpoint_dir} is a '{stage}' run; predict "
                                     "needs a finetune run (a classifier)")
    run_folder.check_outside_run(workdir, config.checkpoint_dir, "predict")
    run_files.check_kinds(workdir, OUTPUTS, keeper="predict writes")  # before the model loads and every image
    class_names = run_folder.load_class_names(run_folder.run_workdir(config.checkpoint_dir))
    items, skipped = inputs.list_inputs(config.inputs, class_names)
    if not items:
        raise config_lib.ConfigError(f"config.inputs={config.inputs} holds no image to predict ({len(skipped)} other "
                                     f"file(s)); give an image, a folder of images or a HaGRID tree")
    if config.view == "hand_crop" and any(item.box is None for item in items):
        raise config_lib.ConfigError(f"config.view=hand_crop needs a HaGRID tree (a gesture box per image) and "
                                     f"{config.inputs} is not one; use --config.view=auto or original")
    restored = setup.restore_run(config.checkpoint_dir, str(config.checkpoint))
    names, image_size, mesh = restored.class_names, restored.model.config.img_size, restored.mesh
    trained = resume_check.recorded_view(restored.workdir)
    if config.view == "auto":
        logging.info("view: %s", f"'{trained}', as the run was evaluated" if trained else
                     "the run records no evaluation view (an older run): hand crops where inputs have boxes, "
                     "else the centre crop; set --config.view to choose")
    top_k = min(config.top_k, len(names))
    # Whole rows for every device, no more than the inputs (beyond them a batch holds only padding),
    # and one that fits the host's memory (checked before the first batch is made).
    batch = evaluation.batch_size_for(config.batch_size, len(items), mesh)
    host_resources.check_batch_fits(batch, image_size, jax.process_count(), jax.default_backend() == "cpu")

    @jax.jit
    def probabilities(weights: setup.Weights, images: jax.Array) -> jax.Array:
        logits = restored.model.apply({"params": weights.params, "batch_stats": weights.batch_stats},
                                      steps.standardize(images), train=False)
        return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    rows, sheet, enlarged, cropped_away = [], [], [], []
    centre_cropped = 0  # inputs without a gesture box, predicted by a run evaluated on hand crops

    def load(item: inputs.Input) -> np.ndarray | str:
        return _load(item, _view(config, item, trained), image_size)

    with concurrent.futures.ThreadPoolExecutor(host_resources.pool_size(config.num_workers)) as pool, \
            tqdm.tqdm(total=len(items), desc="predict", unit=" images", mininterval=2.0) as bar:
        for start in range(0, len(items), batch):
            chunk = items[start:start + batch]
            loaded = list(pool.map(load, chunk))
            good = [(item, seen) for item, seen in zip(chunk, loaded) if not isinstance(seen, str)]
            skipped += [(item.path, seen) for item, seen in zip(chunk, loaded) if isinstance(seen, str)]
            enlarged += [(item.path, seen) for item, seen in good if seen.enlargement > MAX_ENLARGEMENT]
            cropped_away += [(item.path, seen) for item, seen in good if seen.mode == "original"
                             and views.centre_crop_share(*seen.source_size) < MIN_CENTRE_CROP_SHARE]
            bar.update(len(chunk))
            if not good:
                continue
            images = np.zeros((batch, image_size, image_size, 3), np.uint8)
            images[: len(good)] = np.stack([seen.pixels for _, seen in good])
            probs = np.asarray(probabilities(restored.weights, sharding.global_batch({"image": images}, mesh)["image"]))
            setup.check_outputs_finite(bool(np.isfinite(probs[: len(good)]).all()), restored, "probabilities")
            for (item, seen), p in zip(good, probs):
                order = np.argsort(-p, kind="stable")[:top_k]
                rows.append({"file": item.path, "annotation": item.annotation,
                             "top_k": [{"class": names[i], "prob": float(p[i])} for i in order]})
                centre_cropped += config.view == "auto" and trained == "hand_crop" and item.box is None
                if len(sheet) < SHEET_SIZE:
                    sheet.append((seen.pixels, rows[-1]))
    skipped.sort()
    _write(epath.Path(workdir), rows, skipped, top_k, {"run": restored.workdir, "step": restored.step})
    if sheet:
        _draw(sheet, str(epath.Path(workdir) / "predictions.png"))
    else:  # no input decoded: an earlier run's sheet must not stand beside these files
        (epath.Path(workdir) / "predictions.png").unlink(missing_ok=True)
    if not rows:
        raise config_lib.ConfigError(f"none of the {len(items)} image file(s) in config.inputs={config.inputs} could "
                                     f"be read; {workdir}/skipped.csv says why for each")
    if centre_cropped:
        logging.warning("the run was evaluated on hand crops, and %d input(s) have no gesture box: those were "
                        "centre-cropped instead", centre_cropped)
    if enlarged:
        path, seen = enlarged[0]
        logging.warning("%d input(s) are so small that the model saw them enlarged more than %gx (e.g. %s, %dx%d "
                        "px, %.0fx for the model's %d px): predictions on a few source pixels mean little",
                        len(enlarged), MAX_ENLARGEMENT, _printable(path), *seen.source_size, seen.enlargement,
                        image_size)
    if cropped_away:
        path, seen = cropped_away[0]
        width, height = seen.source_size  # as decoded (a JPEG draft keeps the shape)
        logging.warning("%d input(s) are far from square: the model saw only their centre crop (e.g. %s, %.1f:1: "
                        "%.0f %% of it); a hand off-centre is not in it: crop such images around the hand first",
                        len(cropped_away), _printable(path), max(width, height) / max(min(width, height), 1),
                        100 * views.centre_crop_share(width, height))
    # Inputs annotated with a gesture the run does not know cannot agree: counted apart.
    annotated = [row for row in rows if row["annotation"] in names]
    unknown = sum(bool(row["annotation"]) and row["annotation"] not in names for row in rows)
    agree = sum(row["top_k"][0]["class"] == row["annotation"] for row in annotated)
    logging.info("[predict] %d file(s) predicted with %s step %d%s%s%s; wrote %s", len(rows), restored.workdir,
                 restored.step,
                 f"; the top class is the annotated one for {agree} of {len(annotated)}" if annotated else "",
                 f" ({unknown} annotated with gestures the run was not trained on)" if unknown else "",
                 f"; {len(skipped)} skipped ({workdir}/skipped.csv says why)" if skipped else "",
                 ", ".join(f"{workdir}/{name}" for name in ("predictions.csv", "predictions.jsonl", "predictions.png")))
    return {"predicted": len(rows), "skipped": len(skipped)}
