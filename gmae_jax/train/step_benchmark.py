"""Pretraining-step throughput of a preset in float32 (the baseline) and bfloat16, in one process,
so the printed ratio compares like with like on whatever devices are present."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from gmae_jax import config_lib
from gmae_jax.models.gmae import GMAE
from gmae_jax.models.presets import model_config
from gmae_jax.train import sharding, steps, trainer


def pretrain_images_per_second(preset: str, dtype: str, batch_size: int, num_steps: int) -> float:
    """Images/s of the jitted, data-parallel pretraining step after one warm-up (compile) step."""
    model_fields = config_lib.model_config(preset, dtype=dtype)
    gmst = model_config(model_fields)
    model = GMAE(gmst)
    optim = ml_collections.ConfigDict(dict(
        lr=1e-4, min_lr=1e-6, warmup_steps=10, weight_decay=0.05, b1=0.9, b2=0.999, grad_clip=1.0,
        layer_decay=1.0))
    run = ml_collections.ConfigDict(dict(optim=optim, model=model_fields, seed=0))
    mesh = sharding.make_mesh()
    size = gmst.img_size
    state, _ = trainer.create_state(
        model, (jnp.zeros((1, size, size, 3)), jnp.zeros((1, gmst.num_patches), bool)), run, mesh, 1000)
    loss_fn = functools.partial(steps.pretrain_loss, model=model, mask_ratio=0.6, norm_pix_loss=False)
    step = sharding.jit_train_step(functools.partial(steps.train_step, loss_fn=loss_fn), mesh, state)
    images = np.random.default_rng(0).normal(size=(batch_size, size, size, 3)).astype(np.float32)
    batch = sharding.global_batch({"image": images}, mesh)
    rng = jax.random.key(0)
    state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(num_steps):
        state, metrics = step(state, batch, rng)
    jax.block_until_ready(metrics)
    return batch_size * num_steps / (time.perf_counter() - start)


def run_step_benchmark(preset: str, batch_size: int, num_steps: int) -> dict[str, float]:
    results = {dtype: pretrain_images_per_second(preset, dtype, batch_size, num_steps)
               for dtype in ("float32", "bfloat16")}
    device = jax.devices()[0]
    print(f"pretraining step, preset {preset}, batch {batch_size}, {jax.device_count()} x {device.device_kind}")
    for dtype, rate in results.items():
        print(f"  {dtype:9s} {rate:10.1f} img/s   x{rate / results['float32']:.2f} vs float32")
    return results
