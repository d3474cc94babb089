"""GMST building blocks in Flax linen, mirroring the PyTorch original layer by layer.

Layouts are NHWC images and (B, N, C) tokens. Names of submodules follow the PyTorch `state_dict`
keys so that `gmae_jax.torch_mirror.convert` is a mechanical rename + transpose. Numerics follow
PyTorch: exact GELU, LayerNorm and BatchNorm eps 1e-5 with two-pass variance, BatchNorm momentum 0.1 (Flax 0.9).
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from gmae_jax.models import batch_axes, fast_conv
from gmae_jax.models.presets import patch_embed_geometry
from gmae_jax.models.sparse import VisibleConv, VisibleGrid

Dtype = Any

# Initialisers of the original (see gmst_reference.md, "Initialisation").
kaiming_normal_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
xavier_uniform = nn.initializers.xavier_uniform()
# PyTorch's default Conv/Linear init: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)).
torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# PyTorch's trunc_normal_(std=.02) cuts at +-2 in absolute terms (100 std): in effect a normal of std
# 0.02. Flax's default cut at +-2 std would give a spread of 0.0176.
trunc_normal_002 = nn.initializers.truncated_normal(stddev=0.02, lower=-100.0, upper=100.0)


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for Conv/Linear: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def layer_scale_init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
    """Layer-scale gammas start at N(1, 0.02) as in the original."""
    return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


_SQRT_HALF = 0.7071067811865476


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, `x * Phi(x)`, written as PyTorch's CPU kernel writes it: `0.5 x (1 + erf(x / sqrt 2))`.

    `jax.nn.gelu(approximate=False)` goes through `erfc`, which XLA:CPU expands into exp-based code
    about 3x slower than its `erf` polynomial; the two agree to float32 rounding.
    """
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(_SQRT_HALF, x.dtype)))


def layer_norm(name: str | None = None, dtype: Dtype = jnp.float32) -> nn.LayerNorm:
    """LayerNorm with PyTorch's eps and variance computation."""
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, name=name)


def tokens_to_image(x: jax.Array, height: int, width: int) -> jax.Array:
    """(B, H*W, C) row-major tokens -> (B, H, W, C)."""
    return x.reshape(x.shape[0], height, width, x.shape[-1])


def image_to_tokens(x: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B, H*W, C) in row-major order."""
    return x.reshape(x.shape[0], -1, x.shape[-1])


class ConvBNGELU(nn.Module):
    """Conv -> BatchNorm -> GELU, the original's `nn.Sequential(conv, bn, gelu)` (keys `.0`, `.1`).

    With `visible`, x and the output are the visible tokens (B, L_vis, C) of the sparse encoder:
    the conv is evaluated at visible cells only (masked cells read zero) and BatchNorm's statistics
    are those of the visible cells. Parameters are the same as the dense layer's.
    """

    features: int
    kernel_size: int = 3
    dilation: int = 1
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # fast_conv.CONV_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, visible: VisibleGrid | None = None) -> jax.Array:
        if visible is not None:
            x = VisibleConv(
                self.features, self.kernel_size, self.dilation, kaiming_normal_fan_out, self.dtype,
                name="conv",
            )(x, visible)
        else:
            pad = self.dilation * (self.kernel_size // 2)
            x = nn.Conv(
                self.features,
                (self.kernel_size, self.kernel_size),
                kernel_dilation=self.dilation,
                padding=((pad, pad), (pad, pad)),
                kernel_init=kaiming_normal_fan_out,
                dtype=self.dtype,
                conv_general_dilated=fast_conv.for_impl(self.conv_impl),
                name="conv",
            )(x)
        x = nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
            use_fast_variance=False,  # PyTorch's two-pass variance: E[x^2] - E[x]^2 cancels on offset inputs
            axis_name=batch_axes.batch_norm_axis(), name="bn",
        )(x)
        return gelu(x)


class OverlapPatchEmbed(nn.Module):
    """Patch projection (conv) -> row-major tokens -> LayerNorm. Returns tokens and the grid."""

    embed_dim: int
    patch_size: int
    overlap: bool = False
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # fast_conv.CONV_IMPLS

    @nn.compact
    def __call__(self, images: jax.Array) -> tuple[jax.Array, int, int]:
        kernel, stride, pad = patch_embed_geometry(self.patch_size, self.overlap)
        fan_in = images.shape[-1] * kernel * kernel
        x = nn.Conv(
            self.embed_dim,
            (kernel, kernel),
            strides=stride,
            padding=((pad, pad), (pad, pad)),
            kernel_init=torch_default_kernel,
            bias_init=torch_default_bias(fan_in),
            dtype=self.dtype,
            conv_general_dilated=fast_conv.for_impl(self.conv_impl),
            name="proj",
        )(images)
        _, height, width, _ = x.shape
        x = layer_norm("norm", self.dtype)(image_to_tokens(x))
        return x, height, width


class MSDC(nn.Module):
    """Multi-scale dilated convolution with spatial and channel (squeeze-excite) attention.

    Four branches (1x1 and 3x3 with dilations 1, 2, 3) -> 1x1 fusion -> spatial attention from the
    channel mean/max -> channel attention; the residual `+ x` is inside, as in the original.

    With `visible` (the sparse encoder), x is the visible tokens (B, L_vis, C): masked cells are zero
    for the convolutions (the 7x7 spatial attention included) and the squeeze-excite average is over
    the visible cells.
    """

    dim: int
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # fast_conv.CONV_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, visible: VisibleGrid | None = None) -> jax.Array:
        branch = self.dim // 4
        branches = [
            ConvBNGELU(branch, 1, 1, self.dtype, self.conv_impl, name="conv1x1")(x, train, visible),
            ConvBNGELU(branch, 3, 1, self.dtype, self.conv_impl, name="dconv1")(x, train, visible),
            ConvBNGELU(branch, 3, 2, self.dtype, self.conv_impl, name="dconv2")(x, train, visible),
            ConvBNGELU(branch, 3, 3, self.dtype, self.conv_impl, name="dconv3")(x, train, visible),
        ]
        m = ConvBNGELU(self.dim, 1, 1, self.dtype, self.conv_impl, name="fusion")(
            jnp.concatenate(branches, axis=-1), train, visible
        )

        pooled = jnp.stack([m.mean(axis=-1), m.max(axis=-1)], axis=-1)
        if visible is None:
            spatial = nn.Conv(
                1, (7, 7), padding=((3, 3), (3, 3)), kernel_init=kaiming_normal_fan_out,
                dtype=self.dtype, conv_general_dilated=fast_conv.for_impl(self.conv_impl), name="sa_conv",
            )(pooled)
        else:
            spatial = VisibleConv(1, 7, 1, kaiming_normal_fan_out, self.dtype, name="sa_conv")(
                pooled, visible
            )
        s = m * nn.sigmoid(spatial)

        spatial_axes = tuple(range(1, s.ndim - 1))  # (H, W) of a grid, L_vis of visible tokens
        e = s.mean(axis=spatial_axes)
        e = gelu(nn.Dense(self.dim // 16, kernel_init=xavier_uniform, dtype=self.dtype, name="se_fc1")(e))
        e = nn.sigmoid(nn.Dense(self.dim, kernel_init=xavier_uniform, dtype=self.dtype, name="se_fc2")(e))
        return s * jnp.expand_dims(e, spatial_axes) + x


@jax.custom_vjp
def attention_logits(query: jax.Array, key: jax.Array) -> jax.Array:
    """(B, L, heads, head_dim) queries and keys -> (B, heads, L, L) float32 logits, accumulated and
    kept in float32 whatever the inputs' dtype, as `jax.nn.dot_product_attention` and fused attention
    kernels keep them (rounded to bfloat16 they carried ~2x its error into the softmax). The
    gradients stay matmuls in the inputs' dtype (autodiff would make them float32 matmuls)."""
    return jnp.einsum("...qhd,...khd->...hqk", query, key, preferred_element_type=jnp.float32)


def _attention_logits_forward(query: jax.Array, key: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return attention_logits(query, key), (query, key)


def _attention_logits_backward(saved: tuple[jax.Array, jax.Array], grad: jax.Array) -> tuple[jax.Array, jax.Array]:
    query, key = saved
    grad = grad.astype(query.dtype)
    return jnp.einsum("...hqk,...khd->...qhd", grad, key), jnp.einsum("...hqk,...qhd->...khd", grad, query)


attention_logits.defvjp(_attention_logits_forward, _attention_logits_backward)


def attention_with_dropout(query: jax.Array, key: jax.Array, value: jax.Array, dropout_rng: jax.Array,
                           rate: float) -> jax.Array:
    """Attention with dropout on the probabilities, (B, L, heads, head_dim) in and out.

    Flax's `nn.dot_product_attention` with float32 logits and softmax, except that the probabilities
    go back to the compute dtype after it (Flax keeps them float32, which in a bfloat16 step made the
    probabilities-times-values matmul and both its gradients float32 matmuls); in float32 the numbers
    and the dropout mask are Flax's.
    """
    dtype = query.dtype
    query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
    probs = jax.nn.softmax(attention_logits(query, key))
    keep = jax.random.bernoulli(dropout_rng, 1.0 - rate, probs.shape)
    probs = probs * (keep.astype(jnp.float32) / (1.0 - rate))
    return jnp.einsum("...hqk,...khd->...qhd", probs.astype(dtype), value)


class MHSA(nn.Module):
    """Multi-head self-attention laid out like `torch.nn.MultiheadAttention` (packed q, k, v).

    Uses `jax.nn.dot_product_attention` (its XLA implementation: JAX picks cuDNN's fused kernel
    only when asked, and at 196 tokens the score matrix is small); attention-probability dropout,
    which that function lacks, goes through `attention_with_dropout` in training only.
    """

    dim: int
    num_heads: int
    dropout_rate: float = 0.1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        batch, length, _ = x.shape
        head_dim = self.dim // self.num_heads
        qkv = nn.Dense(3 * self.dim, kernel_init=xavier_uniform, dtype=self.dtype, name="in_proj")(x)
        q, k, v = jnp.split(qkv.reshape(batch, length, 3 * self.num_heads, head_dim), 3, axis=2)
        if train and self.dropout_rate > 0.0:
            out = attention_with_dropout(q, k, v, self.make_rng("dropout"), self.dropout_rate)
        else:
            out = jax.nn.dot_product_attention(q, k, v)
        out = out.reshape(batch, length, self.dim)
        return nn.Dense(self.dim, kernel_init=xavier_uniform, dtype=self.dtype, name="out_proj")(out)


class MSCFFN(nn.Module):
    """Multi-scale convolutional feed-forward: 3 dilated branches -> fusion -> fc1 -> GELU -> fc2.

    With `visible` (the sparse encoder), x is the visible tokens (B, L_vis, C) and so is the output.
    """

    hidden: int
    out: int
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # fast_conv.CONV_IMPLS

    @nn.compact
    def __call__(self, x: jax.Array, train: bool, visible: VisibleGrid | None = None) -> jax.Array:
        branch = self.hidden // 3
        branches = [
            ConvBNGELU(branch, 3, dilation, self.dtype, self.conv_impl, name=f"dconv{dilation}")(x, train, visible)
            for dilation in (1, 2, 3)
        ]
        h = ConvBNGELU(self.hidden, 1, 1, self.dtype, self.conv_impl, name="fusion")(
            jnp.concatenate(branches, axis=-1), train, visible
        )
        h = image_to_tokens(h)  # a no-op on visible tokens
        h = gelu(nn.Dense(4 * self.hidden, kernel_init=xavier_uniform, dtype=self.dtype, name="fc1")(h))
        return nn.Dense(self.out, kernel_init=xavier_uniform, dtype=self.dtype, name="fc2")(h)


class GMSTBlock(nn.Module):
    """MSDC -> self-attention -> MSC-FFN with layer scales; post-norm (`norm3`) on the output.

    With `visible` (the sparse encoder), x is the visible tokens (B, L_vis, C) of the H x W grid;
    attention, norms and layer scales then see the visible tokens only.
    """

    dim: int
    num_heads: int
    ffn_dim: int
    attention_dropout: float = 0.1
    dtype: Dtype = jnp.float32
    conv_impl: str = "auto"  # fast_conv.CONV_IMPLS

    @nn.compact
    def __call__(
        self, x: jax.Array, height: int, width: int, train: bool, visible: VisibleGrid | None = None
    ) -> jax.Array:
        def grid(tokens: jax.Array) -> jax.Array:  # the convolutional parts' input layout
            return tokens if visible is not None else tokens_to_image(tokens, height, width)

        gamma1 = self.param("gamma1", layer_scale_init, (self.dim,))
        gamma2 = self.param("gamma2", layer_scale_init, (self.dim,))
        gamma3 = self.param("gamma3", layer_scale_init, (self.dim,))

        msdc = MSDC(self.dim, self.dtype, self.conv_impl, name="msdc")(grid(x), train, visible)
        x = x + gamma1 * image_to_tokens(msdc)

        h = layer_norm("norm1", self.dtype)(x)
        x = x + gamma2 * MHSA(self.dim, self.num_heads, self.attention_dropout, self.dtype, name="attn")(
            h, train
        )
        # The original defines norm2 and never uses it; its weights are part of the state_dict.
        if self.is_initializing():
            layer_norm("norm2", self.dtype)(x)

        ffn = MSCFFN(self.ffn_dim, self.dim, self.dtype, self.conv_impl, name="mscffn")(grid(x), train, visible)
        return layer_norm("norm3", self.dtype)(x + gamma3 * ffn)


def _save_matmul_and_conv_outputs(primitive, *_, **__) -> bool:
    """Remat policy 'fine': keep what is expensive to recompute, recompute norms and activations."""
    return primitive.name in ("dot_general", "conv_general_dilated")


def gmst_block_class(remat: str) -> type[GMSTBlock]:
    """GMSTBlock, or GMSTBlock rematerialised in the backward pass ('block': keep only its input;
    'fine': also keep its matmul and conv outputs). Parameter names are unchanged."""
    if remat == "none":
        return GMSTBlock
    policy = _save_matmul_and_conv_outputs if remat == "fine" else None
    # Arguments counted with the module as 0: height, width and train are Python values.
    return nn.remat(GMSTBlock, static_argnums=(2, 3, 4), policy=policy)
