"""The finetune stage: the (pretrained) encoder trained as a gesture classifier (configs/finetune.py)."""

from __future__ import annotations

from collections.abc import Sequence
import os

import ml_collections
from absl import logging
from etils import epath

from gmae_jax import config_checks, config_lib, schema
from gmae_jax.data import hagrid_layout, sources, subsets
from gmae_jax.train import run_folder, trainer

# Evaluation metrics of a classifier that config.best_metric may name.
METRICS = ("loss", "cross_entropy", "accuracy", "top5_accuracy", "macro_f1", "weighted_f1")
# The one answer to one-class data, whether it comes from the config or from the data folder.
ONE_CLASS = "a classifier needs two classes or more; add the images of a second class"


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    config_checks.validate_training(config)
    config_checks.check(config.num_classes >= 2, f"config.num_classes={config.num_classes} must be at least 2: {ONE_CLASS}")
    if config.data.classes not in (hagrid_layout.OFFICIAL, hagrid_layout.PRESENT):
        names = hagrid_layout.parse_class_list(config.data.classes)
        config_checks.check(len(names) >= 2,
                            f"config.data.classes={config.data.classes!r} names one class: {ONE_CLASS}")
        config_checks.check(len(names) == config.num_classes,
                            f"config.num_classes={config.num_classes} but config.data.classes names {len(names)}; "
                            f"set --config.num_classes={len(names)}")
    config_checks.check(0.0 <= config.label_smoothing < 1.0,
                        f"config.label_smoothing={config.label_smoothing} must be in [0, 1)")
    config_checks.check(config.best_metric != "top5_accuracy" or config.num_classes > 5,
                        f"config.best_metric='top5_accuracy' needs more than 5 classes (config.num_classes="
                        f"{config.num_classes}: every class is in the top 5); use accuracy")
    config_checks.check_best_metric(schema.read_flat(schema.LoopConfig, config), METRICS)
    finetune = schema.read_flat(schema.FinetuneConfig, config)
    config_checks.check(finetune.labels_per_class >= 0,
                        f"config.labels_per_class={finetune.labels_per_class} must be >= 0 (0 = all labels)")
    config_checks.check_seed(finetune.subset_seed, "subset_seed")
    if check_data:  # the demo writes its data only when it runs
        config_checks.check_data_root(config.data.root)


def open_data(config: ml_collections.ConfigDict) -> sources.Splits:
    """The class folders / HaGRID splits of `config.data`, checked against `config.num_classes`;
    the training split cut to `config.labels_per_class` images per class when that is set."""
    data_config = schema.read(schema.DataConfig, config.data, "config.data")
    data = sources.open_sources(data_config)
    if len(data.class_names) < 2:
        raise config_lib.ConfigError(
            f"the data in {config.data.root} has one class ({', '.join(data.class_names)}): {ONE_CLASS}")
    if len(data.class_names) != config.num_classes:
        raise config_lib.ConfigError(
            f"config.num_classes={config.num_classes} but the data in {config.data.root} has "
            f"{len(data.class_names)} classes ({', '.join(data.class_names)}); set "
            f"--config.num_classes={len(data.class_names)}")
    free_hands = data_config.mode == "hand_crop" and data_config.no_gesture_prob > 0  # crops of no_gesture
    empty = [name for name in subsets.classes_without_images(data.train, data.class_names)
             if not (free_hands and name == hagrid_layout.NO_GESTURE)]
    if empty:
        raise config_lib.ConfigError(
            f"the training split in {config.data.root} holds no image of {len(empty)} of the "
            f"{len(data.class_names)} classes ({', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}), which "
            f"the classifier could never learn: "
            f"{_only_the_classes_found(data.train.prepared, data_config.classes, data.class_names, empty)}")
    finetune = schema.read_flat(schema.FinetuneConfig, config)
    train = subsets.class_balanced_subset(data.train, data.class_names, finetune.labels_per_class,
                                          finetune.subset_seed)
    return data._replace(train=train)


def frozen_random_encoder_warning(config: ml_collections.ConfigDict) -> str | None:
    """A linear probe of an encoder nobody trained is a baseline at best; more likely init_from was forgotten."""
    finetune = schema.read_flat(schema.FinetuneConfig, config)
    if finetune.freeze_encoder and not finetune.init_from:
        return ("config.freeze_encoder=True without config.init_from: only the head trains, on a randomly "
                "initialised encoder (a random-features baseline); set --config.init_from=PRETRAIN_RUN to probe "
                "a pretrained one")
    return None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    config_checks.check(not config.init_from or os.path.realpath(run_folder.run_workdir(config.init_from))
                        != os.path.realpath(workdir),
                        f"config.init_from={config.init_from} is this fine-tune's own --workdir={workdir}; point it "
                        "at the workdir of a pretraining run")
    # Read only by a run's first step: a resumed run restores its own checkpoints (the pretraining run
    # may have been moved or deleted since).
    config_checks.check(not config.init_from or epath.Path(config.init_from).exists()
                        or bool(run_folder.checkpoint_steps(workdir)),
                        f"config.init_from={config.init_from} does not exist; point it at the workdir of a "
                        "pretraining run, or set --config.init_from='' to train from scratch")
    if warning := frozen_random_encoder_warning(config):
        logging.warning("%s", warning)
    return trainer.train(config, workdir, open_data(config))


def _only_the_classes_found(prepared: bool, classes: str, names: Sequence[str], empty: Sequence[str]) -> str:
    """The flag that trains on the classes with images, spelled out: `present` alone would loop where a
    class folder holds images that no annotation file lists (its class is found, its images are not)."""
    listed = f"--config.data.classes={','.join(name for name in names if name not in empty)}"
    if prepared:  # the prepare stage fixed the corpus's classes
        return f"prepare the corpus again with {listed} (the classes with images here)"
    if classes == hagrid_layout.PRESENT:
        return f"name the classes with images, {listed} (present counts every class folder, annotated or not)"
    return f"--config.data.classes=present trains on the classes found, or name those with images: {listed}"
