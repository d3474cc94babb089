"""A drop-in `conv_general_dilated` for `nn.Conv` that computes every 2-D convolution as a matmul.

Why: G-MAE's convolutions (3x3 with dilations 1-3 and few output features, the 7x7 2 -> 1 spatial
attention, the patch embedding) are shapes that convolution libraries handle poorly unless tuned.
On an H200, XLA:GPU's autotuner (cuDNN algorithms for them, and GEMM fusions) took ~290 s of a 368 s
compile, and with the autotuner off the step ran 79x slower (BENCHMARKS.md, sessions 4 and 8). As
matmuls they need no convolution library at all: a 1x1 convolution is a `dot` over channels; a k x k
one reads each output's window into one row (im2col: k*k shifted slices of the padded input, side by
side in the kernel's HWIO order) and multiplies by the flattened kernel; a patch embedding whose
stride equals its kernel is a reshape into patches. (On XLA:CPU a 1x1 convolution's kernel gradient
is also much slower than the same `dot`.)

The window rows are k*k times the input; `jax.checkpoint` drops them after the forward pass and
rebuilds them from the input in the backward one (slices only, no FLOPs), so memory stays that of
a convolution. Parameters, shapes and numerics are nn.Conv's; grouped convolutions and input
dilation go to `lax.conv_general_dilated` unchanged.

A stride-1 window convolution can also be one matmul of the input into every tap's outputs
(`x @ [W_tap0 | ... | W_tap8]`, C_in -> k*k*C_out) followed by a shifted sum of the taps: nothing
k*k times the input is ever built, and G-MAE's window convolutions have few outputs (C/4, hidden/3),
so the per-tap outputs are 2.25-3x the input where im2col rows are 9x; the backward pass keeps only
the input. A roofline estimate of XLA's program for an H100 puts `small`'s pretraining step ~10 %
and `reference`'s ~3 % faster this way (BENCHMARKS.md, session 28); not yet measured on a GPU, so it
is an option.

Which convolutions become matmuls is `config.model.conv_impl` (`CONV_IMPLS`): 'matmul' all of them;
'taps' as 'matmul', stride-1 windows as tap sums; 'xla' only the 1x1 ones and the patch embedding,
window convolutions staying XLA's (XLA:CPU's beat im2col 1.3-1.9x on the 3x3 ones, forward +
backward, and tap sums too; TPUs run convolutions natively); 'auto' (default) is 'matmul' on GPUs
and in CPU gradient accumulation, 'xla' elsewhere (`resolve`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax


def _channel_last(ndim: int) -> lax.ConvDimensionNumbers:
    """nn.Conv's layout: (N, *spatial, C) input and output, (*spatial, in, out) kernel."""
    return lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *range(1, ndim - 1)),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *range(1, ndim - 1)),
    )


_UNPADDED = ((0, 0), (0, 0))


def _explicit_padding(padding: Any) -> tuple[tuple[int, int], ...] | None:
    if isinstance(padding, str):
        return _UNPADDED if padding == "VALID" else None
    return tuple((int(low), int(high)) for low, high in padding)


def _is_pointwise(kernel_hw: tuple[int, int], strides: tuple[int, int],
                  padding: tuple[tuple[int, int], ...]) -> bool:
    """Each output reads one input position: the input itself is the rows."""
    return kernel_hw == (1, 1) and strides == (1, 1) and padding == _UNPADDED


def _is_patchify(x_shape: tuple[int, ...], kernel_hw: tuple[int, int], strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> bool:
    """Non-overlapping patches tiling the input: the rows are a reshape of it."""
    return kernel_hw == strides and padding == _UNPADDED and dilation == (1, 1) \
        and x_shape[1] % kernel_hw[0] == 0 and x_shape[2] % kernel_hw[1] == 0


def _window_rows(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, int]) -> jax.Array:
    """(N, H, W, C) -> (N, Ho, Wo, kh*kw*C): every output position's input window, taps in
    row-major kernel order, matching an HWIO kernel reshaped to (kh*kw*C, F)."""
    (kh, kw), (sh, sw), (dh, dw) = kernel_hw, strides, dilation
    if _is_pointwise(kernel_hw, strides, padding):
        return x
    if _is_patchify(x.shape, kernel_hw, strides, padding, dilation):
        batch, height, width, channels = x.shape
        patches = x.reshape(batch, height // kh, kh, width // kw, kw, channels)
        return patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, height // kh, width // kw, kh * kw * channels)
    x = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    out_h = (x.shape[1] - dh * (kh - 1) - 1) // sh + 1
    out_w = (x.shape[2] - dw * (kw - 1) - 1) // sw + 1
    taps = [
        lax.slice(x, (0, i * dh, j * dw, 0),
                  (x.shape[0], i * dh + (out_h - 1) * sh + 1, j * dw + (out_w - 1) * sw + 1, x.shape[3]),
                  (1, sh, sw, 1))
        for i in range(kh) for j in range(kw)
    ]
    return jnp.concatenate(taps, axis=-1)


def _matmul_conv(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                 padding: tuple[tuple[int, int], ...], dilation: tuple[int, int], precision: Any) -> jax.Array:
    kh, kw, channels, features = kernel.shape
    rows = _window_rows(x, (kh, kw), strides, padding, dilation)
    return lax.dot_general(rows, kernel.reshape(kh * kw * channels, features),
                           (((rows.ndim - 1,), (0,)), ((), ())), precision=precision)


# Nothing inside is saved for the backward pass: the inputs are, and the window rows are rebuilt.
_matmul_conv_rebuilding_rows = jax.checkpoint(
    _matmul_conv, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(2, 3, 4, 5))


def _tap_sum_conv(x: jax.Array, kernel: jax.Array, padding: tuple[tuple[int, int], ...],
                  dilation: tuple[int, int], precision: Any) -> jax.Array:
    """A stride-1 window convolution as one matmul into every tap's outputs, then their shifted sum:
    out[y, x] = sum over taps (i, j) of (padded x @ W[i, j])[y + i*dh, x + j*dw]. The taps are added
    in float32 (each is rounded to the compute dtype once, as a matmul's output is)."""
    kh, kw, channels, features = kernel.shape
    (dh, dw), (pad_h, pad_w) = dilation, padding
    batch, height, width, _ = x.shape
    every_tap = kernel.transpose(2, 0, 1, 3).reshape(channels, kh * kw * features)
    per_tap = lax.dot_general(x, every_tap, (((3,), (0,)), ((), ())), precision=precision)
    # Padding the per-tap outputs is padding the input: a zero input row gives zero outputs.
    per_tap = jnp.pad(per_tap.reshape(batch, height, width, kh * kw, features),
                      ((0, 0), pad_h, pad_w, (0, 0), (0, 0)))
    out_h = height + sum(pad_h) - dh * (kh - 1)
    out_w = width + sum(pad_w) - dw * (kw - 1)
    total = sum(lax.slice(per_tap, (0, i * dh, j * dw, i * kw + j, 0),
                          (batch, i * dh + out_h, j * dw + out_w, i * kw + j + 1, features))[:, :, :, 0]
                .astype(jnp.float32)
                for i in range(kh) for j in range(kw))
    return total.astype(per_tap.dtype)


CONV_IMPLS = ("auto", "matmul", "taps", "xla")


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
    lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
    *, windows: str = "matmul",
) -> jax.Array:
    """`lax.conv_general_dilated` with the signature `nn.Conv` calls, as a matmul where it can be:
    always for 1x1 kernels and non-overlapping patches; other windows as `windows` says ('matmul':
    im2col rows; 'taps': tap sums where the stride is 1, else rows; 'xla': XLA's convolution)."""
    explicit = _explicit_padding(padding)
    if (lhs.ndim == 4 and dimension_numbers == _channel_last(4) and feature_group_count == 1
            and explicit is not None and tuple(lhs_dilation or (1, 1)) == (1, 1)):
        kernel_hw, strides, dilation = rhs.shape[:2], tuple(window_strides), tuple(rhs_dilation or (1, 1))
        if _is_pointwise(kernel_hw, strides, explicit):
            return _matmul_conv(lhs, rhs, strides, explicit, dilation, precision)  # nothing to rebuild
        if windows == "taps" and strides == (1, 1):
            return _tap_sum_conv(lhs, rhs, explicit, dilation, precision)
        if windows != "xla" or _is_patchify(lhs.shape, kernel_hw, strides, explicit, dilation):
            return _matmul_conv_rebuilding_rows(lhs, rhs, strides, explicit, dilation, precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
    )


def resolve(conv_impl: str, backend: str, accumulating: bool = False) -> str:
    """`config.model.conv_impl` made concrete: 'auto' is 'matmul' on GPUs, and on CPU inside gradient
    accumulation's micro-batch loop (XLA:CPU runs convolutions in a loop body ~6x slower, matmuls at
    full speed: `mini` batch 64 at k=4, 1,567 vs 273 ms per step); 'xla' otherwise."""
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl='{conv_impl}' is not one of {CONV_IMPLS}")
    if conv_impl != "auto":
        return conv_impl
    return "matmul" if backend == "gpu" or (backend == "cpu" and accumulating) else "xla"


def for_impl(conv_impl: str) -> Callable[..., jax.Array]:
    """The `conv_general_dilated` that `nn.Conv` should call under `config.model.conv_impl` on the
    backend being traced for."""
    return functools.partial(conv_general_dilated, windows=resolve(conv_impl, jax.default_backend()))
