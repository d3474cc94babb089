"""Data parallelism: the jit step on 8 simulated devices trains exactly like on one."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmae_jax import config_lib
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.presets import gmst_config
from gmae_jax.train import sharding, steps, trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def run_steps(model, init_inputs, loss_fn, config, devices, batches):
    mesh = sharding.make_mesh(devices)
    state, _ = trainer.create_state(model, init_inputs, config, mesh, steps_total=10)
    step = sharding.jit_train_step(functools.partial(steps.train_step, loss_fn=loss_fn), mesh, state)
    losses = []
    for batch in batches:
        state, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(0))
        losses.append(float(metrics["loss"]))
    return jax.device_get(state.params), jax.device_get(state.batch_stats), losses


def batches(n, size, num_classes=4):
    rng = np.random.default_rng(0)
    return [{"image": rng.normal(size=(16, size, size, 3)).astype(np.float32),
             "label": rng.integers(0, num_classes, 16).astype(np.int32)} for _ in range(n)]


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_eight_devices_match_one_device(stage):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), stage, "runlocal")
    config.model.attention_dropout = 0.0  # dropout masks are drawn per shard layout; keep it exact
    gmst = gmst_config(config.model)
    image = jnp.zeros((1, gmst.img_size, gmst.img_size, 3))
    if stage == "pretrain":
        model = GMAE(gmst)
        init_inputs = (image, jnp.zeros((1, gmst.num_patches), bool))
        loss_fn = functools.partial(steps.pretrain_loss, model=model, mask_ratio=0.6, norm_pix_loss=False)
    else:
        model = GMAEClassifier(gmst, 4)
        init_inputs = (image,)
        loss_fn = functools.partial(steps.classifier_loss, model=model, label_smoothing=0.1)
    data = batches(3, gmst.img_size)
    one = run_steps(model, init_inputs, loss_fn, config, jax.devices()[:1], data)
    eight = run_steps(model, init_inputs, loss_fn, config, jax.devices(), data)
    np.testing.assert_allclose(one[2], eight[2], rtol=1e-4)
    assert one[2][0] != one[2][-1]  # it actually trained
    assert_trees_close(one[0], eight[0])
    assert_trees_close(one[1], eight[1])
