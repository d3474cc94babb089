"""The faster formulations in the model compute what the plain ones compute."""

import dataclasses
import functools
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax
from jax.ad_checkpoint import print_saved_residuals

from gmae_jax.models import fast_conv, modules
from gmae_jax.models.gmae import GMAE
from gmae_jax.models.presets import PRESETS, GMSTConfig


def test_gelu_is_torch_exact_gelu():
    x = np.concatenate([np.linspace(-12, 12, 4001), np.random.default_rng(0).normal(0, 3, 4000)])
    x = x.astype(np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x)).numpy()
    actual = np.asarray(jax.jit(modules.gelu)(x))
    assert np.max(np.abs(actual - expected)) < 2e-6 * np.max(np.abs(expected))
    # Not the tanh approximation, which is off by ~1e-3 near |x| = 2.
    assert np.max(np.abs(actual - np.asarray(jax.nn.gelu(x, approximate=True)))) > 1e-4


def test_gelu_gradient_matches_jax_exact_gelu():
    x = jnp.linspace(-6, 6, 1001)
    ours = jax.vmap(jax.grad(modules.gelu))(x)
    reference = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x)
    np.testing.assert_allclose(ours, reference, atol=2e-6)


def _conv(fn, x, kernel, dilation, padding, stride=1):
    dims = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return fn(x, kernel, (stride, stride), padding, lhs_dilation=(1, 1), rhs_dilation=(dilation, dilation),
              dimension_numbers=dims, feature_group_count=1)


# (kernel, dilation, stride, padding, input channels): G-MAE's convolutions in small: 1x1, 3x3
# dilated 1-3, the 7x7 2 -> 1 spatial attention, the overlapping and the non-overlapping patch embedding.
CONVS = [(1, 1, 1, 0, 5), (3, 1, 1, 1, 5), (3, 3, 1, 3, 5), (7, 1, 1, 3, 2), (5, 1, 2, 2, 3), (4, 1, 4, 0, 3)]


@pytest.mark.parametrize("impl", ["matmul", "taps", "xla"])
@pytest.mark.parametrize("size, dilation, stride, pad, channels", CONVS)
def test_conv_matches_lax_conv_with_gradients(impl, size, dilation, stride, pad, channels):
    rng = np.random.default_rng(size + dilation + stride)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, channels)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(size, size, channels, 4)), jnp.float32)
    padding = [(pad, pad)] * 2
    ours_fn = fast_conv.for_impl(impl)

    def loss(fn, x, kernel):
        return jnp.sum(jnp.sin(_conv(fn, x, kernel, dilation, padding, stride)))

    def close(actual, expected):  # summation order differs: tolerance relative to the magnitude
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))))

    gradients = jax.jit(jax.grad(loss, (1, 2)), static_argnums=0)  # compiled: k*k slices run eagerly are slow
    for ours, reference in zip(gradients(ours_fn, x, kernel), gradients(lax.conv_general_dilated, x, kernel)):
        close(ours, reference)
    close(_conv(ours_fn, x, kernel, dilation, padding, stride),
          _conv(lax.conv_general_dilated, x, kernel, dilation, padding, stride))


def test_window_rows_are_rebuilt_in_the_backward_pass_not_stored(capsys):
    x, kernel = jnp.ones((2, 6, 6, 5)), jnp.ones((3, 3, 5, 4))
    fn = fast_conv.for_impl("matmul")
    print_saved_residuals(lambda x, k: jnp.sum(jnp.sin(_conv(fn, x, k, 2, [(2, 2)] * 2))),
                                            x, kernel)
    saved = capsys.readouterr().out
    assert "[2,6,6,5]" in saved and "[2,6,6,4]" in saved, saved  # the input; sin's cos
    assert "45]" not in saved, saved  # never the 9 x 5 window rows


def test_tap_sums_keep_only_the_input_for_the_backward_pass(capsys):
    x, kernel = jnp.ones((2, 6, 6, 5)), jnp.ones((3, 3, 5, 4))
    fn = fast_conv.for_impl("taps")
    print_saved_residuals(lambda x, k: jnp.sum(jnp.sin(_conv(fn, x, k, 2, [(2, 2)] * 2))), x, kernel)
    saved = capsys.readouterr().out
    assert "[2,6,6,5]" in saved and "[2,6,6,4]" in saved, saved  # the input; sin's cos
    # Never the per-tap outputs (9 x 4 per position, padded or not); the reshaped kernel is kernel-sized.
    assert "[2,6,6,36]" not in saved and "[2,6,6,9," not in saved and "[2,10,10," not in saved, saved


def test_tap_sums_in_bfloat16_add_in_float32():
    """Each tap's output is rounded to bfloat16 once, as a matmul's is; their sum is not rounded per
    addition, so it stays as close to a float32 convolution as im2col's single matmul does."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 64)), jnp.bfloat16)
    kernel = jnp.asarray(rng.normal(size=(3, 3, 64, 16)) / 24, jnp.bfloat16)
    exact = _conv(lax.conv_general_dilated, x.astype(jnp.float32), kernel.astype(jnp.float32), 2, [(2, 2)] * 2)
    errors = {impl: float(jnp.max(jnp.abs(_conv(fast_conv.for_impl(impl), x, kernel, 2, [(2, 2)] * 2)
                                          .astype(jnp.float32) - exact))) for impl in ("matmul", "taps")}
    assert _conv(fast_conv.for_impl("taps"), x, kernel, 2, [(2, 2)] * 2).dtype == jnp.bfloat16
    assert errors["taps"] < 2 * errors["matmul"] + 1e-2, errors


@pytest.mark.parametrize("impl, size, convolutions_left", [
    ("matmul", 3, False), ("taps", 3, False), ("xla", 3, True), ("auto", 3, True), ("xla", 1, False)])
def test_conv_impl_decides_which_convolutions_become_dots(impl, size, convolutions_left):
    layer = modules.ConvBNGELU(8, kernel_size=size, dilation=2, conv_impl=impl)
    x = jnp.ones((2, 6, 6, 6))
    variables = layer.init(jax.random.key(0), x, train=False)
    hlo = jax.jit(lambda v: layer.apply(v, x, train=False)).lower(variables).as_text()

    assert variables["params"]["conv"]["kernel"].shape == (size, size, 6, 8)  # nn.Conv's parameters
    if convolutions_left:
        assert "convolution" in hlo
    else:
        assert "convolution" not in hlo and "dot_general" in hlo
    assert jax.default_backend() == "cpu"  # 'auto' above: window convolutions stay XLA's off GPUs


@pytest.mark.parametrize("impl, convolutions_left", [("matmul", False), ("taps", False), ("xla", True)])
def test_conv_impl_reaches_every_convolution_of_the_model(impl, convolutions_left):
    # Lowered only (no compile): patch embedding, encoder and decoder blocks all follow the config.
    config = dataclasses.replace(GMSTConfig(**PRESETS["micro"]), conv_impl=impl)
    model = GMAE(config)
    images, mask = jnp.zeros((2, 32, 32, 3)), jnp.zeros((2, config.num_patches), bool)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), images, mask)
    hlo = jax.jit(lambda v: model.apply(v, images, mask, train=False)).lower(variables).as_text()
    assert ("convolution" in hlo) == convolutions_left


def test_the_model_computes_the_same_under_every_conv_impl():
    """The pretraining model's reconstruction (patch embedding, encoder and decoder blocks) with the
    same variables: only how the convolutions are computed differs."""
    config = GMSTConfig(**PRESETS["micro"])
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    mask = jnp.arange(config.num_patches)[None, :].repeat(2, 0) % 3 == 0
    variables = GMAE(config).init(jax.random.key(0), images, mask, train=False)
    outputs = {impl: jax.jit(functools.partial(GMAE(dataclasses.replace(config, conv_impl=impl)).apply,
                                               train=False))(variables, images, mask)
               for impl in fast_conv.CONV_IMPLS}
    assert jax.tree.leaves(outputs["xla"])
    for impl, output in outputs.items():
        for ours, reference in zip(jax.tree.leaves(output), jax.tree.leaves(outputs["xla"])):
            np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(reference))),
                                       err_msg=impl)


def test_keep_freed_memory_applies_on_glibc():
    # In a fresh process, as entry points call it (it changes the allocator process-wide).
    code = "from gmae_jax import host_memory; assert host_memory.keep_freed_memory() is True"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
