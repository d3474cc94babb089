"""The study stage: pretrain once, then fine-tune from scratch / the pretrained encoder / a frozen
pretrained encoder on seeded class-balanced label subsets, and report accuracy vs labels
(configs/study.py). Every run is an ordinary pretrain or finetune stage run in its own workdir:

  W/pretrain/                         the pretraining run (unless config.init_from names one)
  W/runs/<init>_<labels>_s<seed>/     one fine-tune each, with its result.json once finished
  W/label_efficiency.json, .png       every run and the summary over seeds
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
from etils import epath

from gmae_jax import config_checks, config_lib, label_efficiency, run_files, schema, workdir_lock
from gmae_jax.data import sources, subsets
from gmae_jax.stages import finetune as finetune_stage
from gmae_jax.stages import pretrain as pretrain_stage
from gmae_jax.train import resume_check, run_folder, trainer

RESULT = "result.json"  # written into a fine-tune's workdir when it has finished
JSON, PNG = "label_efficiency.json", "label_efficiency.png"


def inits(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The starting points the study compares."""
    return ("scratch", "pretrained") + (("linear_probe",) if config.linear_probe else ())


def validate(config: ml_collections.ConfigDict, check_data: bool = True) -> None:
    """The study's own fields and both recipes; `check_data=False` (the demo) skips the folders,
    which do not exist yet."""
    config_checks.check(bool(config.pretrain_data) != bool(config.init_from),
                        "set exactly one of --config.pretrain_data=UNLABELLED_ROOT (pretrain here) and "
                        f"--config.init_from=PRETRAIN_WORKDIR (got pretrain_data='{config.pretrain_data}', "
                        f"init_from='{config.init_from}')")
    counts = config.labels_per_class
    config_checks.check(isinstance(counts, (tuple, list))
                        and all(isinstance(n, int) and not isinstance(n, bool) for n in counts),
                        f"config.labels_per_class={counts!r} must be whole numbers, e.g. '(5,10,25,0)'")
    config_checks.check(len(counts) > 0 and all(n >= 0 for n in counts),
                        f"config.labels_per_class={tuple(counts)} must be counts >= 0 (0 = all labels), e.g. "
                        "'(5,10,25,0)'")
    config_checks.check(len(config.seeds) > 0, "config.seeds is empty; give at least one, e.g. '(0,1,2)'")
    for seed in config.seeds:
        config_checks.check_seed(seed, f"seeds={tuple(config.seeds)}: each seed")
    for name in ("labels_per_class", "seeds"):  # a repeat would count one run twice in the mean
        values = list(config[name])
        config_checks.check(len(set(values)) == len(values),
                            f"config.{name}={tuple(values)} repeats a value; give each once")
    config_checks.check(config.finetune.total_steps > 0,
                        f"config.finetune.total_steps={config.finetune.total_steps}: the study gives every fine-tune "
                        "the same fixed number of steps (epochs would give runs with more labels more steps); "
                        "set it > 0, e.g. --config.finetune.total_steps=1000")
    given = schema.read_flat(schema.FinetuneConfig, config.finetune)
    loop = schema.read_flat(schema.LoopConfig, config.finetune)
    config_checks.check(not given.init_from, "config.finetune.init_from is set by the study; use --config.init_from")
    # Fields each of the study's fine-tunes gets from the study itself: a value given for them would
    # be replaced without a word.
    for section, name, use in ((given, "freeze_encoder", "--config.linear_probe"),
                               (given, "labels_per_class", "--config.labels_per_class"),
                               (given, "subset_seed", "--config.seeds"),
                               (loop, "seed", "--config.seeds")):
        value, default = getattr(section, name), getattr(type(section), name)
        config_checks.check(value == default, f"config.finetune.{name}={value!r} is set by the study for each of its "
                            f"runs; use {use}")
    with _fields_named_as_in_the_study("pretrain"):
        pretrain_stage.validate(pretrain_config(config), check_data=False)
    with _fields_named_as_in_the_study("finetune"):
        finetune_stage.validate(finetune_config(config, "pretrained", 0, 0, num_classes=2), check_data=False)
    if check_data:  # after every value, as the stages do: a bad one is named even before the data is there
        config_checks.check(not config.init_from or os.path.isdir(config.init_from),
                            f"config.init_from='{config.init_from}' {config_checks.not_a_folder(config.init_from)}; "
                            "point it at a pretraining workdir")
        if config.init_from:
            _check_pretraining_run(config.init_from)
        config_checks.check(not config.pretrain_data or os.path.isdir(config.pretrain_data)
                            or "://" in config.pretrain_data,
                            f"config.pretrain_data='{config.pretrain_data}' does not exist; point it at the "
                            "unlabelled images")
        config_checks.check_data_root(config.data.root)


def _fields_named_as_in_the_study(recipe: str) -> contextlib.AbstractContextManager[None]:
    """A recipe's errors name its fields as the study's flags do: `config.optim.lr` of the fine-tune
    recipe is `config.finetune.optim.lr`. The labelled data is the study's own `config.data`; the
    pretraining data root is `config.pretrain_data`."""
    data = {"pretrain": {"data.root": "pretrain_data", "data.": "pretrain.data."}, "finetune": {"data.": "data."}}
    return config_checks.fields_named_under(recipe, data[recipe])


def _check_pretraining_run(folder: str) -> None:
    """init_from must be a pretraining run with a checkpoint: a fine-tune's encoder has learned from
    the labelled split the study measures, and a folder without weights would fail after the
    scratch runs had trained."""
    workdir = run_folder.run_workdir(folder)
    stage = run_folder.load_run_config(workdir).stage
    config_checks.check(stage == "pretrain", f"config.init_from={folder} is a '{stage}' run; the study compares "
                        "against a pretraining run (a fine-tune's encoder has seen the labels it is scored on)")
    config_checks.check(bool(run_folder.checkpoint_steps(workdir)), f"config.init_from={folder} has no checkpoint yet")


def pretrain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    pretrain = config.pretrain.copy_and_resolve_references()
    pretrain.data.root = config.pretrain_data
    return pretrain


def finetune_config(config: ml_collections.ConfigDict, init: str, per_class: int, seed: int, *,
                    num_classes: int, pretrain_dir: str = "") -> ml_collections.ConfigDict:
    """One fine-tune of the study: the shared recipe with this run's start, labels and seed."""
    run = config.finetune.copy_and_resolve_references()
    with run.unlocked():  # the entry point locks configs; `data` is the study's, added here
        run.data = config.data.copy_and_resolve_references()
    run.num_classes = num_classes
    run.init_from = pretrain_dir if init != "scratch" else ""
    run.freeze_encoder = init == "linear_probe"
    run.labels_per_class = per_class
    run.subset_seed = seed
    run.seed = seed
    return run


def run_name(init: str, per_class: int, seed: int) -> str:
    return f"{init}_{label_efficiency.labels_name(per_class)}_s{seed}"


def _latest_step(run_dir: str) -> int | None:
    """The newest checkpoint step of a run folder (what a fine-tune's init_from starts from)."""
    return max(run_folder.checkpoint_steps(run_folder.run_workdir(run_dir)), default=None)


def _changes_since(result: dict[str, Any], config: ml_collections.ConfigDict, workdir: str,
                   init_step: int | None = None) -> list[str]:
    """How the finished fine-tune in `workdir` differs from the one `config` asks for: its recipe
    (any field but logging and worker counts; more steps too) or the pretraining step it started from,
    or would start from: `init_step` where the study's pretraining has yet to run (else the latest)."""
    stored = epath.Path(workdir) / run_folder.CONFIG_FILE
    changes = []
    if stored.exists():
        old = resume_check.flatten(run_files.read_json(stored))
        binding, harmless = resume_check.compare(old, resume_check.flatten(json.loads(config.to_json_best_effort())))
        changes = [f"{name}: {before!r} -> {after!r}" for name, before, after in binding + harmless
                   if name in resume_check.UPWARD_ONLY or (name, before, after) in binding]
    # (Results written before init_step was recorded are taken as they are.)
    if config.init_from and "init_step" in result:
        latest = _latest_step(config.init_from) if init_step is None else init_step
        if result["init_step"] != latest:
            changes.append(f"pretraining step: {result['init_step']} -> {latest}")
    return changes


def _finished(config: ml_collections.ConfigDict, workdir: str, init_step: int | None = None
              ) -> dict[str, Any] | None:
    """The result of the fine-tune in `workdir` if an earlier invocation finished the same one (None if
    none finished); one finished with another recipe or from another pretraining step is refused."""
    result_path = epath.Path(workdir) / RESULT
    if not result_path.exists():
        return None
    result = run_files.read_json(result_path)
    changes = _changes_since(result, config, workdir, init_step)
    if changes:
        raise config_lib.ConfigError(
            f"{workdir} holds a finished fine-tune of another study setting ({'; '.join(changes)}); nothing was "
            "changed. Run the new study in another --workdir (or move this study's runs/ folder away)")
    return result


def majority_rate(runs: list[dict[str, Any]], num_classes: int) -> float:
    """Chance: the accuracy of always answering the validation split's most frequent class, which a
    classifier that learned only the class balance reaches (1/K on a balanced split). Every run is
    scored on the same split; results written before the counts were recorded give 1/K."""
    counts = next((r["val_class_counts"] for r in runs if sum(r.get("val_class_counts") or ())), None)
    return max(counts) / sum(counts) if counts else 1.0 / num_classes


def _fine_tune(config: ml_collections.ConfigDict, workdir: str,
               fields_named: Callable[[str], contextlib.AbstractContextManager[None]]) -> dict[str, Any]:
    """The result of one fine-tune: read back when finished already (`_finished`), else trained."""
    result = _finished(config, workdir)
    if result is not None:
        return result
    # Each sub-run is a run folder of its own, held like one.
    with workdir_lock.hold(workdir), fields_named("finetune"):
        metrics = finetune_stage.run(config, workdir)
    result = {"init": "linear_probe" if config.freeze_encoder else ("pretrained" if config.init_from else "scratch"),
              "labels_per_class": label_efficiency.labels_name(config.labels_per_class),
              "seed": int(config.seed), "steps": int(config.total_steps),
              "accuracy": float(metrics["accuracy"]), "macro_f1": float(metrics["macro_f1"]),
              "val_class_counts": [int(v) for k, v in metrics.items() if k.startswith("support/")],
              "workdir": workdir,
              "init_step": _latest_step(config.init_from) if config.init_from else None}
    if jax.process_index() == 0:  # one writer per file on several hosts
        run_files.write_text(epath.Path(workdir) / RESULT, json.dumps(result, indent=1))
    return result


def run(config: ml_collections.ConfigDict, workdir: str, *,
        fields_named: Callable[[str], contextlib.AbstractContextManager[None]] | None = None,
        one_labels_per_class: bool = False) -> dict[str, Any]:
    """The study's runs and report. `fields_named(recipe)` names a recipe's fields in its warnings and
    errors as the flags of the config the user gave do (the study's by default; the demo passes its own,
    and `one_labels_per_class`: its config names one)."""
    fields_named = fields_named or _fields_named_as_in_the_study
    data = sources.open_sources(schema.read(schema.DataConfig, config.data, "config.data"))
    num_classes = len(data.class_names)
    for per_class in config.labels_per_class:  # before the pretraining, which may take hours
        subsets.class_balanced_subset(data.train, data.class_names, per_class, seed=0)
    pretrain_dir = config.init_from or os.path.join(workdir, run_folder.STUDY_PRETRAIN_DIR)
    plan = [(finetune_config(config, init, per_class, seed, num_classes=num_classes, pretrain_dir=pretrain_dir),
             os.path.join(workdir, run_folder.STUDY_RUNS_DIR, run_name(init, per_class, seed)))
            for per_class in config.labels_per_class for seed in config.seeds for init in inits(config)]
    # A finished run of another recipe, or from another pretraining step than the one the pretraining
    # below ends at, is refused before anything trains (`_fine_tune` checks each again after it).
    pretrain, pretrain_data, final_step = pretrain_config(config), None, None
    if not config.init_from:
        pretrain_data = sources.open_sources(schema.read(schema.DataConfig, pretrain.data, "config.pretrain_data"))
        final_step = max(trainer.total_steps(pretrain, len(pretrain_data.train)), _latest_step(pretrain_dir) or 0)
    for run_config, run_dir in plan:
        _finished(run_config, run_dir, final_step)
    if not config.init_from:
        with workdir_lock.hold(pretrain_dir), fields_named("pretrain"):
            pretrain_stage.run(pretrain, pretrain_dir, pretrain_data)

    runs = [_fine_tune(run_config, run_dir, fields_named) for run_config, run_dir in plan]

    chance = majority_rate(runs, num_classes)
    summary = label_efficiency.summarize(runs)
    report = {"classes": data.class_names, "chance": chance, "val_images": len(data.eval),
              "train_images": len(data.train), "pretrain": pretrain_dir,
              "finetune_steps": int(config.finetune.total_steps), "runs": runs, "summary": summary}
    if jax.process_index() != 0:  # process 0 writes the report
        return report
    run_files.remove_leftovers(workdir)  # of a report write that a kill cut short
    run_files.write_text(epath.Path(workdir, JSON), json.dumps(report, indent=1))
    label_efficiency.save_plot(summary, os.path.join(workdir, PNG), chance,
                               f"val accuracy on {len(data.eval)} images, {num_classes} classes "
                               f"(mean, min-max over {len(config.seeds)} seed(s))", train_images=len(data.train))
    # The budgets beside the numbers: a smoke-sized study (runlocal) reads like a real one otherwise.
    pretrained = _latest_step(pretrain_dir)
    print(f"\n=== label-efficiency study: validation accuracy, mean (min-max) over seeds; "
          f"chance {chance:.3f}; pretraining {pretrained if pretrained is not None else 'no'} steps, each "
          f"fine-tune {int(config.finetune.total_steps)} ===\n{label_efficiency.table(summary)}\n"
          f"{os.path.join(workdir, JSON)}, {os.path.join(workdir, PNG)}"
          f"{_left_out(workdir, plan, one_labels_per_class)}\n", flush=True)
    return report


def _left_out(workdir: str, plan: list[tuple[Any, str]], one_labels_per_class: bool) -> str:
    """A line naming the finished fine-tunes in the workdir that this invocation's grid left out of the
    report it wrote over the last one (e.g. another labels_per_class run before), and the flags that
    report them all together (the demo reports one labels_per_class: there, the study's config does)."""
    runs = epath.Path(workdir, run_folder.STUDY_RUNS_DIR)
    planned = {os.path.basename(run_dir) for _, run_dir in plan}
    others = sorted(folder.name for folder in runs.iterdir() if folder.name not in planned
                    and (folder / RESULT).exists()) if runs.is_dir() else []
    if not others:
        return ""
    if one_labels_per_class:
        advice = ("the demo reports one labels_per_class; configs/study.py on the demo's data "
                  f"(--config.pretrain_data={workdir}/data/pretrain_dataset --config.data.root="
                  f"{workdir}/data/finetune_dataset) reports several together")
    else:
        results = [{"labels_per_class": label_efficiency.labels_name(config.labels_per_class), "seed": config.seed}
                   for config, _ in plan]
        for name in others:  # a result this version cannot read names no labels or seed: the hint skips it
            try:
                result = json.loads((runs / name / RESULT).read_text())
                results.append({"labels_per_class": result["labels_per_class"], "seed": int(result["seed"])})
            except (OSError, ValueError, KeyError, TypeError):
                continue
        labels = sorted({r["labels_per_class"] for r in results},
                        key=lambda v: (v == label_efficiency.ALL, 0 if v == label_efficiency.ALL else v))
        seeds = sorted({int(r["seed"]) for r in results})
        flag_labels = ",".join("0" if v == label_efficiency.ALL else str(v) for v in labels)
        advice = (f"--config.labels_per_class={flag_labels} --config.seeds={','.join(map(str, seeds))} reports "
                  "them together (finished runs are reused, not trained again)")
    return (f"\nnot in this report: {len(others)} finished run(s) of earlier invocations in {runs} "
            f"({', '.join(others[:4])}{', ...' if len(others) > 4 else ''}); {advice}")
