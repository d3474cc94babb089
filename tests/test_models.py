"""The Flax GMST model: shapes, masking, and that the encoder never sees masked content."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gmae_jax.models import masking, modules
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.presets import PRESETS, GMSTConfig, ffn_hidden_dim
from gmae_jax.bench import model_flops, step_benchmark
from gmae_jax.train import setup, steps

MICRO = GMSTConfig(**PRESETS["micro"])


def small_config(**overrides) -> GMSTConfig:
    return dataclasses.replace(MICRO, **overrides)


@pytest.mark.parametrize("size,patch,overlap", [(32, 4, False), (48, 8, True)])
def test_patch_embed_grid_is_patch_grid(size, patch, overlap):
    embed = modules.OverlapPatchEmbed(32, patch, overlap)
    x = jnp.ones((2, size, size, 3))
    (tokens, h, w), _ = embed.init_with_output(jax.random.key(0), x)
    assert (h, w) == (size // patch, size // patch)
    assert tokens.shape == (2, (size // patch) ** 2, 32)


@pytest.mark.parametrize("dim,grid", [(32, 4), (48, 3)])
def test_msdc_keeps_shape(dim, grid):
    x = jax.random.normal(jax.random.key(0), (2, grid, grid, dim))
    out, variables = modules.MSDC(dim).init_with_output(jax.random.key(1), x, train=False)
    assert out.shape == x.shape
    assert variables["params"]["se_fc1"]["kernel"].shape == (dim, dim // 16)


@pytest.mark.parametrize("dim,mlp_ratio,hidden", [(768, 4.0, 3072), (512, 4.0, 2049), (32, 1.0, 33)])
def test_ffn_hidden_rounds_up_to_multiple_of_three(dim, mlp_ratio, hidden):
    assert ffn_hidden_dim(dim, mlp_ratio) == hidden


@pytest.mark.parametrize("dim,heads,grid", [(32, 2, 4), (48, 3, 6)])
def test_mhsa_and_block_keep_token_shape(dim, heads, grid):
    x = jax.random.normal(jax.random.key(0), (2, grid * grid, dim))
    attn_out, _ = modules.MHSA(dim, heads).init_with_output(jax.random.key(1), x, train=False)
    assert attn_out.shape == x.shape
    block = modules.GMSTBlock(dim, heads, ffn_hidden_dim(dim, 2.0))
    out, variables = block.init_with_output(jax.random.key(1), x, grid, grid, train=False)
    assert out.shape == x.shape
    assert "norm2" in variables["params"]  # defined-but-unused in the original; kept for export


def test_mhsa_dropout_only_in_training():
    x = jax.random.normal(jax.random.key(0), (2, 16, 32))
    attn = modules.MHSA(32, 2, dropout_rate=0.5)
    variables = attn.init(jax.random.key(1), x, train=False)
    eval_a = attn.apply(variables, x, train=False)
    eval_b = attn.apply(variables, x, train=False)
    train_out = attn.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_out, eval_a)


@pytest.mark.parametrize("config", [small_config(), small_config(img_size=48, patch_size=8, overlap_patches=True)])
def test_gmae_and_classifier_output_shapes(config):
    images = jnp.zeros((3, config.img_size, config.img_size, 3))
    mask = masking.sample_mask(jax.random.key(0), 3, config.num_patches, 0.6)
    pred, _ = GMAE(config).init_with_output(jax.random.key(1), images, mask, train=False)
    assert pred.shape == (3, config.num_patches, config.patch_size**2 * 3)
    logits, _ = GMAEClassifier(config, 5).init_with_output(jax.random.key(1), images, train=False)
    assert logits.shape == (3, 5)


# Hidden counts as the original (MAE) keeps int(L * (1 - ratio)) patches: not round(L * ratio) (38, 24, 2).
@pytest.mark.parametrize("num_patches,ratio,hidden", [(64, 0.6, 39), (196, 0.75, 147), (49, 0.5, 25), (10, 0.25, 3)])
def test_sample_mask_hides_the_originals_exact_count_per_example(num_patches, ratio, hidden):
    mask = masking.sample_mask(jax.random.key(3), 16, num_patches, ratio)
    np.testing.assert_array_equal(mask.sum(axis=1), hidden)
    assert len({tuple(row) for row in np.asarray(mask)}) > 1  # masks differ between examples


def test_sample_mask_is_deterministic_for_a_key():
    a = masking.sample_mask(jax.random.key(7), 4, 64, 0.6)
    b = masking.sample_mask(jax.random.key(7), 4, 64, 0.6)
    c = masking.sample_mask(jax.random.key(8), 4, 64, 0.6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_an_examples_evaluation_mask_depends_on_its_id_not_its_place_in_the_batch():
    key = jax.random.key(1234)
    a = np.asarray(masking.per_example_mask(key, jnp.array([3, 5, 9]), 64, 0.6))
    b = np.asarray(masking.per_example_mask(key, jnp.array([9, 3]), 64, 0.6))
    np.testing.assert_array_equal(a[[2, 0]], b)
    np.testing.assert_array_equal(a.sum(axis=1), masking.num_masked(64, 0.6))
    assert len({tuple(row) for row in a}) == 3


def test_the_pretraining_evaluation_error_does_not_depend_on_the_batch_size():
    model = GMAE(MICRO)
    images = jax.random.normal(jax.random.key(0), (8, MICRO.img_size, MICRO.img_size, 3))
    variables = model.init(jax.random.key(1), images, masking.sample_mask(jax.random.key(2), 8, MICRO.num_patches, 0.6),
                           train=False)
    weights = setup.Weights(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"])
    step = jax.jit(functools.partial(steps.pretrain_eval_step, model=model, mask_ratio=0.6, norm_pix_loss=True))

    def error(batch_size: int) -> float:
        sums = [step(weights, {"image": images[i:i + batch_size], "valid": jnp.ones(batch_size),
                               "index": jnp.arange(i, i + batch_size)}) for i in range(0, 8, batch_size)]
        return float(sum(s["loss_sum"] for s in sums) / sum(s["count"] for s in sums))

    np.testing.assert_allclose([error(2), error(4)], error(8), rtol=1e-5)


def test_patchify_round_trip_and_pixel_order():
    images = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    patches = masking.patchify(images, 4)
    assert patches.shape == (2, 4, 48)
    # Patch 1 is the top-right 4x4 block; within it pixels go row, column, channel.
    np.testing.assert_array_equal(patches[0, 1, :3], images[0, 0, 4])
    np.testing.assert_array_equal(patches[0, 1, 12:15], images[0, 1, 4])
    np.testing.assert_array_equal(masking.unpatchify(patches, 4), images)


def _encode(config, images, mask, train=False):
    """Encoder features; in training mode with the BatchNorm statistics the batch updated, and dropout."""
    model = GMAE(config)
    variables = model.init(jax.random.key(0), images, mask, train=False)
    if not train:
        return model.apply(variables, images, mask, train=False, method=GMAE.encode)
    return model.apply(variables, images, mask, train=True, method=GMAE.encode, rngs={"dropout": jax.random.key(3)},
                       mutable=["batch_stats"])


@pytest.mark.parametrize("overlap, train", [(False, False), (True, False), (True, True)])
def test_encoder_never_sees_masked_pixels(overlap, train):
    config = small_config(overlap_patches=overlap)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    mask = masking.sample_mask(jax.random.key(1), 2, config.num_patches, 0.6)
    noise = 10.0 * jax.random.normal(jax.random.key(2), images.shape)
    altered = jnp.where(masking.mask_to_pixels(mask, config.patch_size), noise, images)
    assert not np.allclose(altered, images)
    # In training, BatchNorm's batch statistics (and what they write back) must not see them either.
    for got, want in zip(jax.tree.leaves(_encode(config, images, mask, train)),
                         jax.tree.leaves(_encode(config, altered, mask, train))):
        np.testing.assert_array_equal(got, want)


def test_original_mask_mode_leaks_masked_pixels():
    """The comparison mode reproduces the original's flaw, so the invariance test above is meaningful."""
    config = small_config(mask_mode="original")
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    mask = masking.sample_mask(jax.random.key(1), 2, config.num_patches, 0.6)
    altered = jnp.where(masking.mask_to_pixels(mask, config.patch_size), 5.0, images)
    visible = ~np.asarray(mask)
    a, b = _encode(config, images, mask), _encode(config, altered, mask)
    assert not np.allclose(np.asarray(a)[visible], np.asarray(b)[visible])


def test_visible_pixels_do_change_encoder_output():
    config = small_config(overlap_patches=True)
    images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    mask = masking.sample_mask(jax.random.key(1), 2, config.num_patches, 0.6)
    altered = jnp.where(masking.mask_to_pixels(mask, config.patch_size), images, images + 1.0)
    assert not np.allclose(_encode(config, images, mask), _encode(config, altered, mask))


def test_reference_preset_has_the_original_parameter_count():
    config = GMSTConfig(**PRESETS["reference"])
    images = jnp.zeros((1, 224, 224, 3))
    mask = jnp.zeros((1, config.num_patches), bool)
    shapes = jax.eval_shape(lambda: GMAE(dataclasses.replace(config, mask_mode="original")).init(
        jax.random.key(0), images, mask, train=False))
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    assert 1.30e9 < count(shapes["params"]) < 1.35e9
    assert 1.00e9 < count(shapes["params"]["encoder"]) < 1.04e9


@pytest.mark.parametrize("task, mask_mode, conv_impl", [
    ("pretrain", "encoder", "matmul"), ("pretrain", "encoder", "taps"), ("pretrain", "sparse", "xla"),
    ("finetune", "encoder", "xla"),
])
def test_bfloat16_compute_runs_every_matmul_and_convolution_in_bfloat16(task, mask_mode, conv_impl):
    """Forward and backward, attention dropout included: a float32 operand anywhere would run that
    matmul at float32 speed on tensor cores (as Flax's attention did with its float32 probabilities)."""
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "bfloat16"), depth=1,
                                 mask_mode=mask_mode, conv_impl=conv_impl)
    assert config.attention_dropout > 0
    jaxpr = model_flops.gradients_jaxpr(config, task, 2, mask_ratio=0.6, num_classes=4)
    operands = [(eqn.primitive.name, *(str(v.aval.dtype) for v in eqn.invars)) for eqn in model_flops.matmuls(jaxpr)]
    assert len(operands) > 50
    assert all(types[1:] == ("bfloat16", "bfloat16") for types in operands), sorted(set(operands))


def test_attention_with_dropout_is_flaxs_in_float32_and_keeps_bfloat16_probabilities():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(3, 17, 4, 8)), jnp.float32) for _ in range(3))
    key = jax.random.key(3)
    ours = modules.attention_with_dropout(q, k, v, key, 0.1)
    flax = nn.dot_product_attention(q, k, v, dropout_rng=key, dropout_rate=0.1, broadcast_dropout=False,
                                    deterministic=False, force_fp32_for_softmax=True)
    np.testing.assert_array_equal(ours, flax)  # the same numbers and dropout mask
    assert not np.array_equal(ours, modules.attention_with_dropout(q, k, v, jax.random.key(4), 0.1))
    low = modules.attention_with_dropout(*(x.astype(jnp.bfloat16) for x in (q, k, v)), key, 0.1)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), ours, rtol=0.05, atol=0.05)


def test_bfloat16_attention_in_training_is_as_precise_as_in_evaluation():
    """Training's attention (with dropout) keeps its logits in float32 as evaluation's
    `jax.nn.dot_product_attention` does: rounded to bfloat16 before the softmax, they made its
    error ~1.9x evaluation's (session 38's audit). A dropout rate of 1e-9 keeps every probability."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.normal(scale=2.0, size=(2, 64, 4, 32)), jnp.float32) for _ in range(3))
    exact = jax.nn.dot_product_attention(q, k, v)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    evaluation = np.abs(np.asarray(jax.nn.dot_product_attention(*low), np.float32) - exact).mean()
    training = np.abs(np.asarray(modules.attention_with_dropout(*low, jax.random.key(0), 1e-9), np.float32)
                      - exact).mean()
    assert training <= 1.2 * evaluation, (training, evaluation)
    # Its gradients are those of float32 attention, to bfloat16's precision.
    loss = lambda attend, *qkv: (attend(*qkv).astype(jnp.float32) * exact).sum()  # noqa: E731
    want = jax.grad(loss, argnums=(1, 2, 3))(jax.nn.dot_product_attention, q, k, v)
    got = jax.grad(loss, argnums=(1, 2, 3))(lambda *x: modules.attention_with_dropout(*x, jax.random.key(0), 1e-9),
                                          *low)
    for g, w in zip(got, want):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=0.05, atol=0.05 * float(np.abs(w).max()))


def test_initial_spreads_are_the_originals():
    """pos_embed / mask tokens: PyTorch's trunc_normal_(std=.02), cut at +-2 absolute, so std 0.02
    (Flax's default cut at 2 std gives 0.0176); layer scales N(1, 0.02); convs Kaiming normal, fan_out."""
    config = GMSTConfig(**{**PRESETS["micro"], "embed_dim": 64, "decoder_embed_dim": 64, "img_size": 64})
    model = GMAE(config)
    images, mask = jnp.zeros((1, 64, 64, 3)), jnp.zeros((1, config.num_patches), bool)
    params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), images, mask)["params"]
    embeddings = np.concatenate([np.ravel(params[name]) for name in ("pos_embed", "decoder_pos_embed")])
    assert abs(embeddings.std() / 0.02 - 1) < 0.03 and embeddings.size == 2 * 256 * 64
    blocks = [params["encoder"][f"blocks_{i}"] for i in range(2)]
    gammas = np.concatenate([np.ravel(block[f"gamma{j}"]) for block in blocks for j in (1, 2, 3)])
    assert abs(gammas.mean() - 1) < 0.003 and abs(gammas.std() / 0.02 - 1) < 0.15
    kernel = np.asarray(params["encoder"]["blocks_0"]["mscffn"]["dconv1"]["conv"]["kernel"])  # (3, 3, 64, 21)
    fan_out = kernel.shape[0] * kernel.shape[1] * kernel.shape[3]
    assert abs(kernel.std() / np.sqrt(2.0 / fan_out) - 1) < 0.05


def test_batch_norm_variance_is_two_pass_on_offset_inputs():
    """E[x^2] - E[x]^2 in float32 loses a variance of 0.0025 at a mean of 300 (x^2 ~ 9e4); PyTorch's
    two-pass variance keeps it."""
    x = 300.0 + 0.05 * jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
    layer = modules.ConvBNGELU(3, kernel_size=1)
    variables = layer.init(jax.random.key(1), x, train=False)
    identity = {"kernel": jnp.eye(3)[None, None], "bias": jnp.zeros(3)}  # the conv passes x through
    variables = {**variables, "params": {**variables["params"], "conv": identity}}
    _, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    batch_var = (np.asarray(updates["batch_stats"]["bn"]["var"]) - 0.9) / 0.1  # momentum 0.9 from 1
    np.testing.assert_allclose(batch_var, np.asarray(x, np.float64).var(axis=(0, 1, 2)), rtol=0.02)
