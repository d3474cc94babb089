"""The demo stage: synthetic data -> pretrain -> few-label fine-tunes from the pretrained encoder and
from scratch with the same budget -> both accuracies beside chance (configs/demo.py). The pair is
a one-cell label-efficiency study (gmae_jax/stages/study.py), so it writes what a study writes."""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from gmae_jax import config_lib
from gmae_jax.data import synthetic
from gmae_jax.stages import finetune as finetune_stage
from gmae_jax.stages import pretrain as pretrain_stage
from gmae_jax.stages import study as study_stage


def validate(config: ml_collections.ConfigDict) -> None:
    """The two training configs; their data folders do not exist until the demo writes them."""
    if config.dataset.framing not in synthetic.FRAMINGS:
        raise config_lib.ConfigError(f"config.dataset.framing={config.dataset.framing!r}; choose from "
                                     f"{', '.join(synthetic.FRAMINGS)}")
    pretrain_stage.validate(config.pretrain, check_data=False)
    finetune_stage.validate(config.finetune, check_data=False)
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    ds = config.dataset
    data_root = os.path.join(workdir, "data")
    pretrain_root = os.path.join(data_root, "pretrain_dataset")
    finetune_root = os.path.join(data_root, "finetune_dataset")
    drawing = dict(image_size=ds.image_size, classes=ds.classes, framing=ds.framing)
    synthetic.ensure_demo_dataset(pretrain_root, seed=0, train_per_class=ds.pretrain_train_per_class,
                                  val_per_class=ds.pretrain_val_per_class, **drawing)
    synthetic.ensure_demo_dataset(finetune_root, seed=1, train_per_class=ds.finetune_train_per_class,
                                  val_per_class=ds.finetune_val_per_class, **drawing)

    report = study_stage.run(study_config(config, pretrain_root, finetune_root), workdir)
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
          f"fine-tuning: {runs['pretrained']} (metrics.jsonl, confusion_matrix.png); from scratch: "
          f"{runs['scratch']}\n", flush=True)
    return report
