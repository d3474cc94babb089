"""The faster formulations in the model compute what the plain ones compute."""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax import lax

from gmae_jax.models import fast_conv, modules


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


def _conv(fn, x, kernel, dilation, padding):
    dims = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    return fn(x, kernel, (1, 1), padding, lhs_dilation=(1, 1), rhs_dilation=(dilation, dilation),
              dimension_numbers=dims, feature_group_count=1)


@pytest.mark.parametrize("size, dilation", [(1, 1), (3, 1), (3, 3)])
def test_conv_matches_lax_conv_with_gradients(size, dilation):
    rng = np.random.default_rng(size + dilation)
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 5)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(size, size, 5, 4)), jnp.float32)
    pad = [(dilation * (size // 2),) * 2] * 2

    def loss(fn, x, kernel):
        return jnp.sum(jnp.sin(_conv(fn, x, kernel, dilation, pad)))

    for argnum in (0, 1):
        ours = jax.grad(loss, argnum + 1)(fast_conv.conv_general_dilated, x, kernel)
        reference = jax.grad(loss, argnum + 1)(lax.conv_general_dilated, x, kernel)
        np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        _conv(fast_conv.conv_general_dilated, x, kernel, dilation, pad),
        _conv(lax.conv_general_dilated, x, kernel, dilation, pad), rtol=1e-5, atol=1e-5)


def test_pointwise_conv_becomes_a_dot_and_keeps_conv_parameters():
    layer = modules.ConvBNGELU(8, kernel_size=1)
    x = jnp.ones((2, 4, 4, 6))
    variables = layer.init(jax.random.key(0), x, train=False)
    hlo = jax.jit(lambda v: layer.apply(v, x, train=False)).lower(variables).as_text()

    assert variables["params"]["conv"]["kernel"].shape == (1, 1, 6, 8)
    assert "convolution" not in hlo and "dot_general" in hlo


def test_keep_freed_memory_applies_on_glibc():
    # In a fresh process, as entry points call it (it changes the allocator process-wide).
    code = "from gmae_jax import host_memory; assert host_memory.keep_freed_memory() is True"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
