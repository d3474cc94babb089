"""Starting a fine-tune from a pretraining run (or another fine-tune, e.g. one imported from
PyTorch): its encoder, position embedding and BatchNorm statistics go into the classifier's freshly
initialised state; the head stays fresh."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from absl import logging

from gmae_jax.schema import ConfigError
from gmae_jax.train import setup, steps


def _tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    return {jax.tree_util.keystr(path): tuple(np.shape(leaf))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def load_pretrained_encoder(state: steps.TrainState, pretrain_dir: str) -> steps.TrainState:
    """`state` with the encoder of the latest checkpoint of `pretrain_dir` (a pretrain or finetune
    workdir, or its checkpoints folder). Shapes must match: the same `config.model` in both runs.
    Both models add `pos_embed` before the blocks, so it transfers from either."""
    run = setup.restore_run(pretrain_dir)
    pretrained = run.weights
    source = {"encoder": pretrained.params["encoder"], "pos_embed": pretrained.params["pos_embed"],
              "batch_stats": pretrained.batch_stats["encoder"]}
    target = {"encoder": state.params["encoder"], "pos_embed": state.params["pos_embed"],
              "batch_stats": state.batch_stats["encoder"]}
    have, want = _tree_shapes(source), _tree_shapes(target)
    if have != want:
        diff = sorted(set(have.items()) ^ set(want.items()))[:6]
        raise ConfigError(
            f"the pretrained encoder in {pretrain_dir} does not match config.model (first "
            f"differences: {diff}); use the same --config.model.* as the pretraining run (its "
            "config.json is in its workdir)")
    # The pretraining run's mesh may not be this one's: re-place each array as the target is.
    placed = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), source, target)
    logging.info("loaded the pretrained encoder from %s (step %d)", run.workdir, run.step)
    params = {**state.params, "encoder": placed["encoder"], "pos_embed": placed["pos_embed"]}
    batch_stats = {**state.batch_stats, "encoder": placed["batch_stats"]}
    return state.replace(params=params, batch_stats=batch_stats)
