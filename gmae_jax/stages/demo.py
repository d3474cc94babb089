"""The demo stage: synthetic data -> pretrain -> few-label fine-tunes from the pretrained encoder and
from scratch with the same budget -> both accuracies beside chance (configs/demo.py). The pair is
a one-cell label-efficiency study (gmae_jax/stages/study.py), so it writes what a study writes."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from gmae_jax import config_checks, config_lib
from gmae_jax.data import synthetic
from gmae_jax.stages import finetune as finetune_stage
from gmae_jax.stages import pretrain as pretrain_stage
from gmae_jax.stages import study as study_stage
from gmae_jax.train import run_folder

ONE_PROCESS = True  # a one-machine demo; processes would draw the same images
MAX_IMAGE_SIZE = 1024


def validate(config: ml_collections.ConfigDict) -> None:
    """The two training configs; their data folders do not exist until the demo writes them."""
    ds = config.dataset
    if ds.framing not in synthetic.FRAMINGS:
        raise config_lib.ConfigError(f"config.dataset.framing={ds.framing!r}; choose from "
                                     f"{', '.join(synthetic.FRAMINGS)}")
    unknown = [name for name in ds.classes if name not in synthetic.DEMO_CLASSES]
    config_checks.check(not unknown and len(set(ds.classes)) == len(ds.classes) >= 2,
                        f"config.dataset.classes={tuple(ds.classes)}: choose two or more distinct gestures the "
                        f"generator draws, from {', '.join(synthetic.DEMO_CLASSES)}, as a tuple: "
                        "--config.dataset.classes=\"('fist','palm')\"")
    for name in ("image_size", "pretrain_train_per_class", "pretrain_val_per_class", "finetune_train_per_class",
                 "finetune_val_per_class"):
        config_checks.check(isinstance(ds[name], int) and ds[name] >= 1,
                            f"config.dataset.{name}={ds[name]!r} must be a whole number of at least 1")
    config_checks.check(ds.image_size <= MAX_IMAGE_SIZE,
                        f"config.dataset.image_size={ds.image_size} must be at most {MAX_IMAGE_SIZE}: the generator "
                        "draws each image supersampled, at up to 4x that side, in memory")
    for section in ("pretrain", "finetune"):
        config_checks.check(not config[section].data.root,
                            f"config.{section}.data.root={config[section].data.root!r}: the demo trains on the images "
                            f"it draws into <workdir>/data; for images of your own use configs/study.py (or "
                            f"configs/{section}.py)")
    config_checks.check(config.labels_per_class <= ds.finetune_train_per_class,
                        f"config.labels_per_class={config.labels_per_class} but the demo draws "
                        f"config.dataset.finetune_train_per_class={ds.finetune_train_per_class} labelled images per "
                        "class; lower it, or raise the other")
    for section, stage in (("pretrain", pretrain_stage), ("finetune", finetune_stage)):
        with config_checks.fields_named_under(section):
            stage.validate(config[section], check_data=False)
    study_stage.validate(study_config(config, "<pretrain_dataset>", "<finetune_dataset>"), check_data=False)


def study_config(config: ml_collections.ConfigDict, pretrain_root: str,
                 finetune_root: str) -> ml_collections.ConfigDict:
    """The demo's runs as a study: one labels_per_class, the demo's seeds, its two recipes."""
    finetune = config.finetune.copy_and_resolve_references()
    data = finetune.data
    data.root = finetune_root
    with finetune.unlocked():  # the entry point locks configs; a study holds the data beside the recipe
        del finetune["data"]
    return ml_collections.ConfigDict(dict(
        stage="study", pretrain_data=pretrain_root, init_from="", data=data,
        labels_per_class=(config.labels_per_class,), seeds=tuple(config.seeds), linear_probe=config.linear_probe,
        pretrain=config.pretrain.copy_and_resolve_references(), finetune=finetune))


def _check_trained_on_the_same_data(workdir: str, datasets: dict[str, dict[str, Any]]) -> None:
    """Other `config.dataset` settings would redraw the images under runs trained on the old ones,
    which the study would then reuse as finished: refused before anything is redrawn."""
    trained = [name for name in (run_folder.STUDY_PRETRAIN_DIR, run_folder.STUDY_RUNS_DIR)
               if os.path.exists(os.path.join(workdir, name))]
    changes = sorted({change for root, drawn in datasets.items()
                      for change in synthetic.demo_dataset_changes(root, **drawn)})
    if trained and changes:
        raise config_lib.ConfigError(
            f"{workdir} holds a demo trained on other images ({'; '.join(changes)}); its runs would be reused as "
            f"finished. Use another --workdir, or remove {' and '.join(trained)} there to train anew")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    ds = config.dataset
    data_root = os.path.join(workdir, "data")
    pretrain_root = os.path.join(data_root, "pretrain_dataset")
    finetune_root = os.path.join(data_root, "finetune_dataset")
    drawing = dict(image_size=ds.image_size, classes=ds.classes, framing=ds.framing)
    datasets = {pretrain_root: dict(seed=0, train_per_class=ds.pretrain_train_per_class,
                                    val_per_class=ds.pretrain_val_per_class, **drawing),
                finetune_root: dict(seed=1, train_per_class=ds.finetune_train_per_class,
                                    val_per_class=ds.finetune_val_per_class, **drawing)}
    _check_trained_on_the_same_data(workdir, datasets)
    for root, drawn in datasets.items():
        synthetic.ensure_demo_dataset(root, **drawn)

    report = study_stage.run(study_config(config, pretrain_root, finetune_root), workdir,
                             fields_named=config_checks.fields_named_under,  # config.pretrain.X, config.finetune.X
                             one_labels_per_class=True)
    accuracy = {row["init"]: row["accuracy_mean"] for row in report["summary"]}
    described = {"pretrained": "fine-tuned from the pretrained encoder",
                 "scratch": "trained from scratch (same steps)",
                 "linear_probe": "linear probe on the frozen pretrained encoder"}
    lines = [f"  {described[init]:<46} {accuracy[init]:.3f}" for init in study_stage.inits(config)]
    runs = {r["init"]: r["workdir"] for r in report["runs"]}
    print(f"\n=== G-MAE demo finished ===\n"
          f"accuracy on {finetune_root}/val ({report['val_images']} images) with {config.labels_per_class} "
          f"labelled images per class (mean over seeds {tuple(config.seeds)}):\n" + "\n".join(lines) +
          f"\n  {'chance':<46} {report['chance']:.3f}\n"
          f"pretraining: {report['pretrain']} (metrics.jsonl, reconstructions.png, checkpoints/)\n"
          f"fine-tuning: {runs['pretrained']} (metrics.jsonl, confusion_matrix.png, misclassified.png); from scratch: "
          f"{runs['scratch']}\n", flush=True)
    return report
