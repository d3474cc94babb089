"""Starting a fine-tune from a pretraining run (or another fine-tune, e.g. one imported from
PyTorch): its encoder, position embedding and BatchNorm statistics go into the classifier's freshly
initialised state; the head stays fresh, and so does the position embedding after a pretraining run
in the original's mask mode (which adds its own after the encoder)."""

from __future__ import annotations


import jax
from absl import logging

from gmae_jax.models.presets import GMSTConfig
from gmae_jax.schema import ConfigError
from gmae_jax.train import checkpoint, setup, steps


# The architecture fields that define the encoder: its parameter shapes, and how its attention splits
# them into heads (other heads, same shapes: the weights would load and mean something else).
_ENCODER_FIELDS = ("img_size", "in_channels", "patch_size", "overlap_patches", "embed_dim", "depth",
                   "num_heads", "mlp_ratio")


def _differing_fields(there: GMSTConfig, here: GMSTConfig | None) -> list[str]:
    return [f"model.{name}: {getattr(there, name)} there, {getattr(here, name)} here"
            for name in _ENCODER_FIELDS if here is not None and getattr(there, name) != getattr(here, name)]


def _mismatch(have: dict[str, tuple[int, ...]], want: dict[str, tuple[int, ...]], there: GMSTConfig,
              here: GMSTConfig | None) -> str:
    """What differs, in config fields where they say it, else as the first differing parameters."""
    if fields := _differing_fields(there, here):
        return "; ".join(fields)
    return checkpoint.shape_differences(have, want, "there", "here")


def load_pretrained_encoder(state: steps.TrainState, pretrain_dir: str,
                            model_config: GMSTConfig | None = None) -> steps.TrainState:
    """`state` with the encoder of the latest checkpoint of `pretrain_dir` (a pretrain or finetune
    workdir, or its checkpoints folder). Shapes must match: the same `config.model` in both runs
    (`model_config`, this run's, names the fields that differ). Both models add `pos_embed` before
    the blocks, so it transfers from either, except from a pretraining run in `mask_mode='original'`,
    which adds it after the encoder: the classifier keeps its fresh one, as the original's does."""
    run = setup.restore_run(pretrain_dir, flag="--config.init_from")
    pretrained = run.weights
    source = {"encoder": pretrained.params["encoder"], "pos_embed": pretrained.params["pos_embed"],
              "batch_stats": pretrained.batch_stats["encoder"]}
    target = {"encoder": state.params["encoder"], "pos_embed": state.params["pos_embed"],
              "batch_stats": state.batch_stats["encoder"]}
    have, want = checkpoint.array_shapes(source), checkpoint.array_shapes(target)
    if have != want or _differing_fields(run.model.config, model_config):
        raise ConfigError(
            f"the pretrained encoder in {pretrain_dir} does not match config.model "
            f"({_mismatch(have, want, run.model.config, model_config)}); use the same --config.model.* as "
            f"that run (its config.json is in {run.workdir})")
    # The pretraining run's mesh may not be this one's: re-place each array as the target is.
    placed = jax.tree.map(lambda new, old: jax.device_put(new.astype(old.dtype), old.sharding), source, target)
    loaded = ("pretrained encoder" if run.config.stage == "pretrain" else
              "fine-tuned classifier's encoder (its head is not loaded)")
    logging.info("loaded the %s from %s (step %d)", loaded, run.workdir, run.step)
    after_encoder = run.config.stage == "pretrain" and run.model.config.mask_mode == "original"
    pos_embed = state.params["pos_embed"] if after_encoder else placed["pos_embed"]
    params = {**state.params, "encoder": placed["encoder"], "pos_embed": pos_embed}
    batch_stats = {**state.batch_stats, "encoder": placed["batch_stats"]}
    return state.replace(params=params, batch_stats=batch_stats)
