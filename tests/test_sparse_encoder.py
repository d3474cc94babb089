"""The sparse encoder (`mask_mode='sparse'`): it computes what the dense layers compute on the
zero-filled grid, at the visible cells, never sees masked content, and shares the dense parameters."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from gmae_jax.models import masking, modules
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.presets import PRESETS, GMSTConfig
from gmae_jax.models.sparse import VisibleConv, VisibleGrid
from gmae_jax.train import checkpoint, init_from, resume_check, sharding, steps, trainer
from gmae_jax.bench import sparse_benchmark
from gmae_jax.bench.sparse_benchmark import encoder_flops

# One encoder block keeps the jitted models quick to compile; blocks chain the same code path.
MICRO = GMSTConfig(**{**PRESETS["micro"], "depth": 1})
SPARSE = dataclasses.replace(MICRO, mask_mode="sparse")


def random_grid(height: int, width: int, ratio: float, batch: int = 3, seed: int = 0):
    """A mask with an exact count per row, its VisibleGrid, and visible tokens (B, L_vis, 8)."""
    length = height * width
    mask = masking.sample_mask(jax.random.key(seed), batch, length, ratio)
    visible = VisibleGrid.from_mask(mask, masking.num_visible(length, ratio), height, width)
    tokens = jax.random.normal(jax.random.key(seed + 1), (batch, visible.num_visible, 8))
    return mask, visible, tokens


def test_visible_ids_scatter_and_gather_round_trip():
    mask, visible, tokens = random_grid(4, 5, 0.6)
    ids = np.asarray(visible.ids)
    for row, m in zip(ids, np.asarray(mask)):
        np.testing.assert_array_equal(row, np.flatnonzero(~m))  # ascending visible positions
    grid = visible.scatter(tokens)
    np.testing.assert_array_equal(np.asarray(grid)[np.asarray(mask)], 0.0)
    np.testing.assert_array_equal(visible.gather(grid), tokens)


# A non-square grid catches row/column mix-ups; dilations and the 7x7 spatial attention as in MSDC.
@pytest.mark.parametrize("kernel,dilation", [(1, 1), (3, 1), (3, 2), (3, 3), (7, 1)])
def test_visible_conv_is_the_dense_conv_of_the_zero_filled_grid(kernel, dilation):
    height, width = 4, 5
    mask, visible, tokens = random_grid(height, width, 0.6)
    conv = VisibleConv(6, kernel, dilation, nn.initializers.normal(0.3))
    params = conv.init(jax.random.key(2), tokens, visible)
    pad = dilation * (kernel // 2)
    dense = nn.Conv(6, (kernel, kernel), kernel_dilation=dilation, padding=((pad, pad), (pad, pad)))
    grid = visible.scatter(tokens).reshape(3, height, width, 8)
    want = visible.gather(dense.apply(params, grid).reshape(3, height * width, 6))
    np.testing.assert_allclose(conv.apply(params, tokens, visible), want, rtol=1e-5, atol=1e-5)

    def sparse_loss(params, tokens):
        return jnp.sum(jnp.sin(conv.apply(params, tokens, visible)))

    def dense_loss(params, tokens):
        out = dense.apply(params, visible.scatter(tokens).reshape(3, height, width, 8))
        return jnp.sum(jnp.sin(visible.gather(out.reshape(3, height * width, 6))))

    for got, expected in zip(jax.tree.leaves(jax.grad(sparse_loss, (0, 1))(params, tokens)),
                             jax.tree.leaves(jax.grad(dense_loss, (0, 1))(params, tokens))):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_visible_conv_keeps_no_windows_for_the_backward_pass(capsys):
    _, visible, tokens = random_grid(4, 5, 0.6)  # 3 x 8 visible tokens of 8 channels
    conv = VisibleConv(6, 3, 2)
    params = conv.init(jax.random.key(2), tokens, visible)
    print_saved_residuals(lambda p, t: jnp.sum(jnp.sin(conv.apply(p, t, visible))), params, tokens)
    saved = capsys.readouterr().out
    assert "f32[3,8,6]" in saved, saved  # sin's cos
    assert "72]" not in saved and ",9," not in saved, saved  # never the 3 x 3 windows of 8 channels


def test_conv_bn_gelu_statistics_and_output_are_those_of_the_visible_cells():
    height, width = 4, 4
    mask, visible, tokens = random_grid(height, width, 0.75, batch=4)
    layer = modules.ConvBNGELU(5, 3, 2)
    grid = visible.scatter(tokens).reshape(4, height, width, 8)
    variables = layer.init(jax.random.key(3), grid, train=False)
    _, updates = layer.apply(variables, tokens, train=True, visible=visible, mutable=["batch_stats"])

    conv_out = nn.Conv(5, (3, 3), kernel_dilation=2, padding=((2, 2), (2, 2))).apply(
        {"params": variables["params"]["conv"]}, grid)
    at_visible = np.asarray(visible.gather(conv_out.reshape(4, height * width, 5))).reshape(-1, 5)
    assert at_visible.shape[0] == 4 * 4  # 4 visible cells per example
    stats = updates["batch_stats"]["bn"]
    # Running statistics start at (0, 1) and move 10 % towards the batch's (biased) statistics.
    np.testing.assert_allclose(stats["mean"], 0.1 * at_visible.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * at_visible.var(0), rtol=1e-5, atol=1e-6)

    # With running statistics, the sparse layer is the dense one read at the visible cells.
    sparse_eval = layer.apply(variables, tokens, train=False, visible=visible)
    dense_eval = layer.apply(variables, grid, train=False).reshape(4, height * width, 5)
    np.testing.assert_allclose(sparse_eval, visible.gather(dense_eval), rtol=1e-5, atol=1e-6)


def jit_init(model, *inputs):
    """Jitted init: eager Flax init of a whole model costs seconds of per-op dispatch."""
    return jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), *inputs)


def without_encoder_mask_token(variables):
    return {**variables, "params": {k: v for k, v in variables["params"].items() if k != "encoder_mask_token"}}


def test_parameters_are_the_dense_encoders():
    images = jnp.zeros((1, 32, 32, 3))
    mask = jnp.zeros((1, MICRO.num_patches), bool)
    shapes = lambda model, *args: jax.tree.map(
        lambda x: x.shape, jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), *args))
    sparse, dense = shapes(GMAE(SPARSE), images, mask), shapes(GMAE(MICRO), images, mask)
    assert "encoder_mask_token" in dense["params"] and "encoder_mask_token" not in sparse["params"]
    assert sparse == without_encoder_mask_token(dense)
    classifier = shapes(GMAEClassifier(SPARSE, 4), images)
    assert sparse["params"]["encoder"] == classifier["params"]["encoder"]
    assert sparse["batch_stats"]["encoder"] == classifier["batch_stats"]["encoder"]


def test_with_nothing_masked_sparse_is_the_dense_encoder_mode():
    """All cells visible: the same computation in another layout, BatchNorm statistics included."""
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    mask = jnp.zeros((2, MICRO.num_patches), bool)
    variables = jit_init(GMAE(MICRO), images, mask)

    def run(config, variables, **kwargs):
        apply = functools.partial(GMAE(config).apply, train=True, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.key(2)}, **kwargs)
        return jax.jit(apply)(variables, images, mask)

    dense_pred, dense_stats = run(MICRO, variables)
    sparse_pred, sparse_stats = run(SPARSE, without_encoder_mask_token(variables),
                                    num_visible=MICRO.num_patches)
    np.testing.assert_allclose(sparse_pred, dense_pred, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(sparse_stats), jax.tree.leaves(dense_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("overlap", [False, True])
def test_visible_tokens_never_see_masked_pixels(overlap):
    config = dataclasses.replace(SPARSE, overlap_patches=overlap)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    mask = masking.sample_mask(jax.random.key(1), 2, config.num_patches, 0.6)
    count = masking.num_visible(config.num_patches, 0.6)
    pixels = masking.mask_to_pixels(mask, config.patch_size)
    model = GMAE(config)
    variables = jit_init(model, images, mask)
    # Training mode: BatchNorm normalises with the batch's (visible) statistics; fixed dropout.
    encode = jax.jit(functools.partial(
        model.apply, method=GMAE.encode, num_visible=count, train=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(4)}))

    def encoded(x):
        return encode(variables, x, mask)[0]

    base = encoded(images)
    assert base.shape == (2, count, config.embed_dim)
    masked_changed = jnp.where(pixels, 10.0 * jax.random.normal(jax.random.key(3), images.shape), images)
    np.testing.assert_array_equal(encoded(masked_changed), base)
    visible_changed = jnp.where(pixels, images, images + 1.0)
    assert not np.allclose(encoded(visible_changed), base)


def test_sparse_mode_needs_the_visible_count():
    images = jnp.zeros((2, 32, 32, 3))
    mask = masking.sample_mask(jax.random.key(0), 2, SPARSE.num_patches, 0.5)
    variables = jit_init(GMAE(SPARSE), images, mask)
    with pytest.raises(ValueError, match="pass num_visible=masking.num_visible"):
        GMAE(SPARSE).apply(variables, images, mask, train=False)


def striped_images(batch: int, size: int) -> np.ndarray:
    """Learnable structure: per-example stripes of random frequency and phase."""
    rng = np.random.default_rng(0)
    xs = np.arange(size)[None, :, None, None]
    freq, phase = rng.uniform(0.2, 0.8, (2, batch, 1, 1, 3))
    return np.broadcast_to(np.sin(freq * xs + phase), (batch, size, size, 3)).astype(np.float32)


def test_sparse_pretraining_learns_and_its_encoder_loads_into_the_classifier(tmp_path):
    fields = ml_collections.ConfigDict({**dataclasses.asdict(SPARSE)})
    optim = ml_collections.ConfigDict(dict(lr=3e-3, min_lr=1e-4, warmup_steps=2, weight_decay=0.0,
                                           b1=0.9, b2=0.999, grad_clip=1.0, layer_decay=1.0))
    run = ml_collections.ConfigDict(dict(stage="pretrain", optim=optim, model=fields, seed=0))
    mesh = sharding.make_mesh()
    model = GMAE(SPARSE)
    init_inputs = (jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, SPARSE.num_patches), bool))
    state, _ = trainer.create_state(model, init_inputs, run, mesh, 100)
    loss_fn = functools.partial(steps.pretrain_loss, model=model, mask_ratio=0.75, norm_pix_loss=False)
    step = sharding.jit_train_step(functools.partial(steps.train_step, loss_fn=loss_fn), mesh, state)
    batch = sharding.global_batch({"image": striped_images(8, 32)}, mesh)
    losses = []
    for _ in range(10):
        state, metrics = step(state, batch, jax.random.key(0))
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:2]), losses

    resume_check.write_run_files(run, str(tmp_path), [])  # what restore_run rebuilds the run from
    manager = checkpoint.make_manager(str(tmp_path / "checkpoints"), max_to_keep=1)
    checkpoint.save(manager, 10, state, None)
    manager.wait_until_finished()
    classifier = GMAEClassifier(SPARSE, 4)
    fine_tune, _ = trainer.create_state(classifier, (jnp.zeros((1, 32, 32, 3)),), run, mesh, 10)
    loaded = init_from.load_pretrained_encoder(fine_tune, str(tmp_path))
    for got, want in zip(jax.tree.leaves(loaded.params["encoder"]), jax.tree.leaves(state.params["encoder"])):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(jax.tree.leaves(loaded.batch_stats["encoder"]),
                         jax.tree.leaves(state.batch_stats["encoder"])):
        np.testing.assert_array_equal(got, want)


def test_sparse_encoder_costs_about_the_visible_fraction_of_the_dense_flops():
    images = jnp.zeros((4, 32, 32, 3))
    mask = jnp.zeros((1, MICRO.num_patches), bool)
    flops = {}
    for config in (MICRO, SPARSE):
        model = GMAE(config)
        flops[config.mask_mode] = encoder_flops(model, jit_init(model, images[:1], mask), images, 0.75)
    # 16 of 64 tokens visible: a quarter of the work, plus the dense patch embedding and gathers.
    assert flops["sparse"] < 0.4 * flops["encoder"], flops


def test_the_sparse_vs_dense_benchmark_prints_each_mode_against_the_dense_one(capsys):
    results = sparse_benchmark.print_comparison("micro", batch_size=8, mask_ratio=0.75, num_steps=1, rounds=1,
                                                 depth=1)
    lines = capsys.readouterr().out.splitlines()
    assert "XLA's cost analysis" in lines[0] and "not --model_flops' matmul and convolution count" in lines[0]
    assert [line.split()[0] for line in lines[1:]] == list(results) == ["encoder", "sparse"]
    assert "(x1.00)" in lines[1] and results["sparse"]["step_flops"] < results["encoder"]["step_flops"]


def test_the_sparse_vs_dense_rounds_alternate_which_mode_runs_first(monkeypatch):
    order = []
    monkeypatch.setattr(sparse_benchmark, "build_step", lambda preset, mode, *args, **kwargs: (
        lambda: order.append(mode) or jnp.zeros(()), 1.0, 1.0))
    sparse_benchmark.compare_mask_modes("micro", batch_size=8, mask_ratio=0.75, num_steps=1, rounds=3)
    assert order == ["encoder", "sparse", "sparse", "encoder", "encoder", "sparse"]
