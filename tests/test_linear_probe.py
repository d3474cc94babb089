"""Linear probing (config.freeze_encoder): only the classifier head learns."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from gmae_jax import config_lib
from gmae_jax.models.gmae import GMAEClassifier
from gmae_jax.models.presets import gmst_config
from gmae_jax.stages import finetune
from gmae_jax.train import sharding, steps, trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def test_frozen_encoder_keeps_its_parameters_and_statistics_while_the_head_learns():
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.model.depth = 1
    config.freeze_encoder = True
    config.optim.update(lr=1e-2, warmup_steps=0, weight_decay=0.1)
    gmst = gmst_config(config.model)
    model = GMAEClassifier(gmst, 4)
    mesh = sharding.make_mesh()
    state, _ = trainer.create_state(model, (jnp.zeros((1, 32, 32, 3)),), config, mesh, steps_total=10,
                                    frozen=trainer.FROZEN_BY_LINEAR_PROBING)
    before = jax.device_get(state)
    loss_fn = functools.partial(steps.classifier_loss, model=model, label_smoothing=0.0, freeze_encoder=True)
    step = sharding.make_train_step("jit", loss_fn, mesh, state)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 4, 16).astype(np.int32)}
    losses = []
    for _ in range(4):
        state, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    after = jax.device_get(state)
    for name in trainer.FROZEN_BY_LINEAR_PROBING:
        for x, y in zip(jax.tree.leaves(after.params[name]), jax.tree.leaves(before.params[name]), strict=True):
            np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(after.batch_stats), jax.tree.leaves(before.batch_stats), strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(after.params["head"]["kernel"], before.params["head"]["kernel"])
    assert losses[-1] < losses[0]


def test_probing_an_encoder_nobody_trained_is_a_start_up_warning():
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), "finetune", "runlocal")
    config.freeze_encoder = True
    assert "without config.init_from: only the head trains" in finetune.frozen_random_encoder_warning(config)
    config.init_from = "/runs/pretrain"
    assert finetune.frozen_random_encoder_warning(config) is None
    config.freeze_encoder, config.init_from = False, ""
    assert finetune.frozen_random_encoder_warning(config) is None
