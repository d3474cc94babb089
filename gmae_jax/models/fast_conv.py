"""A drop-in `conv_general_dilated` for `nn.Conv` that computes 1x1 convolutions as matmuls.

A 1x1 convolution is a matmul over channels, but XLA:CPU runs it through its convolution path, whose
kernel gradient (a convolution contracting over batch and space) is markedly slower than the same
`dot`. Passing this function as `nn.Conv(conv_general_dilated=...)` keeps the module, its parameters
and its numerics; every other convolution goes to `lax.conv_general_dilated` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax import lax


def _is_pointwise(rhs: jax.Array, window_strides: Sequence[int], padding: Any, lhs_dilation: Any,
                  rhs_dilation: Any, dimension_numbers: Any, feature_group_count: int) -> bool:
    """A 1x1, stride-1, unpadded, undilated, ungrouped conv on channel-last input and HWIO kernel."""
    ndim = rhs.ndim
    channel_last = lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *range(1, ndim - 1)),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *range(1, ndim - 1)),
    )
    ones = (1,) * (ndim - 2)
    return (
        rhs.shape[: ndim - 2] == ones
        and tuple(window_strides) == ones
        and (padding == "VALID" or all(tuple(p) == (0, 0) for p in padding))
        and tuple(lhs_dilation or ones) == ones
        and tuple(rhs_dilation or ones) == ones
        and dimension_numbers == channel_last
        and feature_group_count == 1
    )


def conv_general_dilated(
    lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
    lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None, feature_group_count: int = 1, precision: Any = None,
) -> jax.Array:
    """`lax.conv_general_dilated` with the signature `nn.Conv` calls; 1x1 kernels become a `dot`."""
    if _is_pointwise(rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                     feature_group_count):
        kernel = rhs.reshape(rhs.shape[-2:])
        return lax.dot_general(lhs, kernel, (((lhs.ndim - 1,), (0,)), ((), ())), precision=precision)
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count, precision=precision,
    )
