"""Optimiser: schedule shape, weight-decay mask and layer-wise decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from gmae_jax.train import optim


def optim_config(**overrides) -> ml_collections.ConfigDict:
    fields = dict(lr=1e-3, min_lr=1e-5, warmup_steps=10, weight_decay=0.05, b1=0.9, b2=0.999,
                  grad_clip=1.0, layer_decay=1.0)
    return ml_collections.ConfigDict({**fields, **overrides})


PARAMS = {
    "pos_embed": jnp.ones((1, 4, 8)),
    "encoder_mask_token": jnp.ones((1, 1, 8)),
    "encoder": {
        "patch_embed": {"proj": {"kernel": jnp.ones((2, 2, 3, 8)), "bias": jnp.ones(8)}},
        "blocks_0": {"gamma1": jnp.ones(8), "attn": {"in_proj": {"kernel": jnp.ones((8, 24)), "bias": jnp.ones(24)}},
                     "norm1": {"scale": jnp.ones(8), "bias": jnp.ones(8)}},
        "blocks_1": {"mscffn": {"fc1": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}}},
        "norm": {"scale": jnp.ones(8), "bias": jnp.ones(8)},
    },
    "head": {"kernel": jnp.ones((8, 3)), "bias": jnp.ones(3)},
}


def test_schedule_warms_up_linearly_then_decays_to_min_lr():
    schedule = optim.learning_rate_schedule(optim_config(), total_steps=100)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 1e-5, rtol=1e-6)
    assert float(schedule(50)) < float(schedule(20))


def test_a_warmup_as_long_as_the_run_is_warned_about_and_ends_at_the_peak():
    schedule = optim.learning_rate_schedule(optim_config(warmup_steps=1000), total_steps=4)
    np.testing.assert_allclose(float(schedule(3)), 1e-3, rtol=1e-6)  # what the warning describes

    message = optim.warmup_warning(1000, 4)
    assert message.startswith("config.optim.warmup_steps=1000 is not shorter than the run's 4 steps")
    assert "never decays" in message
    assert optim.warmup_warning(4, 4) is not None and optim.warmup_warning(3, 4) is None


def test_no_warmup_is_optaxs_schedule_without_its_log_line(caplog):
    """optax logs a line about a linear warm-up of 0 steps, a setting that is valid here."""
    config = optim_config(warmup_steps=0)
    caplog.set_level("INFO")
    optax_own = optax.warmup_cosine_decay_schedule(0.0, config.lr, 0, 50, config.min_lr)
    assert "transition_steps" in caplog.text  # what optax's own schedule prints
    caplog.clear()
    schedule = optim.learning_rate_schedule(config, total_steps=50)
    assert not caplog.records
    for step in range(53):
        assert float(schedule(step)) == float(optax_own(step))


def test_weight_decay_only_on_kernels():
    mask = optim.weight_decay_mask(PARAMS)
    assert mask["encoder"]["patch_embed"]["proj"]["kernel"] and mask["head"]["kernel"]
    assert mask["encoder"]["blocks_0"]["attn"]["in_proj"]["kernel"]
    for no_decay in (mask["pos_embed"], mask["encoder_mask_token"], mask["encoder"]["blocks_0"]["gamma1"],
                     mask["encoder"]["norm"]["scale"], mask["head"]["bias"]):
        assert not no_decay


def test_weight_decay_leaves_masked_leaves_untouched():
    tx, _ = optim.make_optimizer(optim_config(lr=1.0, warmup_steps=0, weight_decay=0.5, grad_clip=0.0), 10, depth=2)
    state = tx.init(PARAMS)
    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    updates, _ = tx.update(zeros, state, PARAMS)
    assert float(jnp.abs(updates["pos_embed"]).max()) == 0.0
    assert float(jnp.abs(updates["encoder"]["blocks_0"]["gamma1"]).max()) == 0.0
    assert float(updates["head"]["kernel"].max()) < 0.0  # decayed towards zero


def test_layer_ids_number_embedding_blocks_and_head():
    ids = optim.layer_ids(PARAMS, depth=2)
    assert ids["pos_embed"] == 0 and ids["encoder"]["patch_embed"]["proj"]["kernel"] == 0
    assert ids["encoder_mask_token"] == 0  # it stands in for patch embeddings, as BEiT's mask token does
    assert ids["encoder"]["blocks_0"]["gamma1"] == 1 and ids["encoder"]["blocks_1"]["mscffn"]["fc1"]["bias"] == 2
    assert ids["encoder"]["norm"]["scale"] == 3 and ids["head"]["kernel"] == 3


def test_layer_decay_scales_updates_by_depth():
    config = optim_config(lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=0.0, layer_decay=0.5)
    tx, _ = optim.make_optimizer(config, 10, depth=2)
    grads = jax.tree.map(jnp.ones_like, PARAMS)
    updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
    head = float(updates["head"]["bias"][0])
    np.testing.assert_allclose(float(updates["encoder"]["blocks_1"]["mscffn"]["fc1"]["bias"][0]), head * 0.5, rtol=1e-5)
    np.testing.assert_allclose(float(updates["pos_embed"][0, 0, 0]), head * 0.125, rtol=1e-5)
