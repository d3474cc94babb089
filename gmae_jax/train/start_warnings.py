"""Settings a run takes but that do less than they suggest, or cost what a user may not expect: one
start-up warning each (pure functions of the settings; `trainer.train` logs them)."""

from __future__ import annotations

from gmae_jax import schema
from gmae_jax.models import fast_conv


def accumulation_warning(grad_accum_steps: int, backend: str, conv_impl: str = "auto") -> str | None:
    """Gradient accumulation is for memory, and on CPU with XLA's convolutions it costs speed: XLA:CPU
    computes convolutions inside the micro-batch loop ~6x slower (BENCHMARKS.md, sessions 7-8), which
    `conv_impl='auto'` avoids by computing them as matmuls there; 'xla' chosen by hand does not."""
    if backend != "cpu" or grad_accum_steps <= 1 or fast_conv.resolve(conv_impl, backend, accumulating=True) != "xla":
        return None
    return (f"config.grad_accum_steps={grad_accum_steps} on CPU with config.model.conv_impl='{conv_impl}': "
            "XLA:CPU computes convolutions inside the micro-batch loop ~6x slower than outside one; "
            "set config.model.conv_impl=auto (convolutions as matmuls, as fast in the loop)")


def step_layout_warnings(stage: str, step_impl: str, fsdp_size: int, mask_mode: str) -> list[str]:
    """Settings that are legal but do less than they suggest: under FSDP shard_map's step gathers the
    weights, where jit's partitioner may move activations instead, which needs far less memory where the
    parameters outweigh a device's activations (BENCHMARKS.md, session 37); a fine-tune's encoder sees
    every token, so the sparse masked encoder is pretraining's alone."""
    warnings = []
    if step_impl == "shard_map" and fsdp_size > 1:
        warnings.append(f"config.step_impl=shard_map with config.mesh.fsdp={fsdp_size}: the step gathers the "
                        "parameters whole to use them, where config.step_impl=jit may move activations instead; "
                        "where the parameters outweigh a device's activations (few, small images a device) jit "
                        "plans far less memory (`small` @ 64 px, one image a device: 140 vs 257 MiB), at a "
                        "training batch the two are within 6 % (BENCHMARKS.md; plan yours with python -m "
                        "gmae_jax.bench --suite=memory --plan_step_impl=shard_map)")
    if stage == "finetune" and mask_mode == "sparse":
        warnings.append("config.model.mask_mode=sparse applies to pretraining only: a fine-tune masks nothing, and its "
                        "encoder computes every token")
    return warnings


def small_dataset_warning(batch_size: int, num_train_examples: int) -> str | None:
    """A batch larger than the training set is legal (epochs run back to back) but rarely meant: each
    batch then repeats images, and BatchNorm's statistics and the loss count them as often."""
    if batch_size <= num_train_examples:
        return None
    return (f"config.batch_size={batch_size} is larger than the {num_train_examples} training images: each "
            "batch holds some images twice or more (BatchNorm and the loss count them so); use a batch of "
            f"at most {num_train_examples}, or more data")


def training_split_evaluated_warning(data: schema.DataConfig, best_metric: str) -> str | None:
    """Evaluating on the training split is legal (does the model fit its images?) but, unasked, it
    passes off a training score as a held-out one, and ranks the best checkpoint by it."""
    if data.eval_split != data.train_split:
        return None
    best = ", and the checkpoint kept as best (by its " + best_metric + ")," if best_metric else ""
    return (f"config.data.eval_split='{data.eval_split}' is the training split: every evaluation{best} is scored "
            "on the images the model trains on, which says how well it fits them, not how well it generalises; "
            f"name a held-out split for that (e.g. --config.data.eval_split={schema.DataConfig.eval_split})")


def nothing_to_train_warning(start_step: int, steps_total: int) -> str | None:
    """A rerun of a finished run (or, under allow_changes, one shortened below its step) trains nothing;
    it evaluates the run as it is, which should not look like a run that trained."""
    if start_step < steps_total:
        return None
    past = "" if start_step == steps_total else f", past this config's total of {steps_total}"
    return (f"nothing to train: the run is at step {start_step}{past}; evaluating it as it is (raise "
            "--config.total_steps to train on)")
