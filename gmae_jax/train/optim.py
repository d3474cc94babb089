"""Optimiser: AdamW with linear warm-up + cosine decay, clipping, a weight-decay mask and optional
layer-wise learning-rate decay, all from optax's own pieces."""

from __future__ import annotations

import re
from typing import Any

import jax
import ml_collections
import optax

PyTree = Any


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to `optim.lr`, then cosine decay to `optim.min_lr` at `total_steps`."""
    warmup = min(optim.warmup_steps, max(total_steps - 1, 0))
    if not warmup:  # the cosine alone, as optax's warm-up schedule computes it after a warm-up of 0 steps
        return optax.cosine_decay_schedule(init_value=optim.lr, decay_steps=max(total_steps, 1),
                                           alpha=optim.min_lr / optim.lr if optim.lr else 0.0)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=optim.min_lr,
    )


def warmup_warning(warmup_steps: int, total_steps: int) -> str | None:
    """A warm-up as long as the run is legal (the schedule clamps it) but rarely meant: the learning
    rate then rises through the whole run, ends at its peak and never decays."""
    if warmup_steps < total_steps:
        return None
    return (f"config.optim.warmup_steps={warmup_steps} is not shorter than the run's {total_steps} steps: the "
            "learning rate rises through the whole run, ends at its peak and never decays; set "
            "--config.optim.warmup_steps to a fraction of the run (e.g. 5-10 %)")


def weight_decay_mask(params: PyTree) -> PyTree:
    """Decay only conv/linear kernels: not biases, norms, position embeddings, mask tokens or gammas."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)


def layer_ids(params: PyTree, depth: int) -> PyTree:
    """0 for what the encoder's first block reads (patch embedding, position embedding, the encoder's
    mask token), i+1 for encoder block i, depth+1 for the rest (the decoder's tokens among it).

    The numbering BEiT-style layer-wise learning-rate decay uses (BEiT puts its mask token at 0 too).
    """

    def layer_id(path, _) -> int:
        names = [p.key for p in path]
        if names[0] in ("pos_embed", "encoder_mask_token") or names[:2] == ["encoder", "patch_embed"]:
            return 0
        if names[0] == "encoder":
            match = re.fullmatch(r"blocks_(\d+)", names[1])
            if match:
                return int(match.group(1)) + 1
        return depth + 1

    return jax.tree_util.tree_map_with_path(layer_id, params)


def make_optimizer(
    optim: ml_collections.ConfigDict, total_steps: int, depth: int, frozen: tuple[str, ...] = ()
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Returns the optimiser and its (undecayed) learning-rate schedule for logging.

    Masks and layer labels are functions of the parameter tree, so the optimiser can be built
    before the parameters exist (they are created already sharded). Top-level parameter groups
    named in `frozen` (linear probing: the encoder) are never updated, decayed or counted in the
    clipping norm.
    """
    schedule = learning_rate_schedule(optim, total_steps)

    def adamw(scale: float) -> optax.GradientTransformation:
        return optax.adamw(
            lambda step: schedule(step) * scale,
            b1=optim.b1,
            b2=optim.b2,
            weight_decay=optim.weight_decay,
            mask=weight_decay_mask,
        )

    if optim.layer_decay < 1.0:
        transforms = {
            f"layer_{i}": adamw(optim.layer_decay ** (depth + 1 - i)) for i in range(depth + 2)
        }
        labels = lambda params: jax.tree.map(lambda i: f"layer_{i}", layer_ids(params, depth))
        update = optax.multi_transform(transforms, labels)
    else:
        update = adamw(1.0)
    chain = [optax.clip_by_global_norm(optim.grad_clip)] if optim.grad_clip > 0 else []
    trained = optax.chain(*chain, update)
    if not frozen:
        return trained, schedule
    labels = lambda params: {name: jax.tree.map(lambda _: "frozen" if name in frozen else "trained", group)  # noqa: E731
                             for name, group in params.items()}
    return optax.multi_transform({"trained": trained, "frozen": optax.set_to_zero()}, labels), schedule
