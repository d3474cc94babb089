"""Model FLOPs of a training step, counted from its jaxpr: every matmul and convolution of the
forward and backward pass (2 per multiply-add), as MFU is usually reckoned.

Why not XLA's cost analysis of the compiled step: on an H200 it reported 20 GFLOPs per image for
`small`'s pretraining step, where XLA:CPU counts 37.5 and this count 39.5; most of the gap is the
3x3 convolutions (~16 GFLOP), which become cuDNN custom calls on GPU (likely left out; not checked
on a GPU). And with remat it counts the recomputation, which is overhead, not model work. The
jaxpr is the same on every backend and is traced without compiling or allocating anything.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core

from gmae_jax.models.presets import GMSTConfig
from gmae_jax.bench import step_benchmark
from gmae_jax.train import setup, steps


def _dot_flops(eqn: core.JaxprEqn) -> float:
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


def _conv_flops(eqn: core.JaxprEqn) -> float:
    """Each output element sums over the kernel's window and its input features (per group), in
    whatever roles the dimension numbers give the operands (gradients are convolutions too)."""
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
    rhs = eqn.invars[1].aval.shape
    window = math.prod(rhs[d] for d in rhs_spec[2:])
    return 2.0 * math.prod(eqn.outvars[0].aval.shape) * window * rhs[rhs_spec[1]]


def _sub_jaxprs(value: Any) -> Iterable[core.Jaxpr]:
    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _sub_jaxprs(item)


def matmul_and_conv_flops(jaxpr: core.Jaxpr) -> float:
    """FLOPs of the `dot_general` and `conv_general_dilated` equations of `jaxpr`, nested ones
    included: a scan's body counts `length` times, a cond its costliest branch, a while loop's
    body once (its trip count is not static)."""
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            total += _dot_flops(eqn)
        elif name == "conv_general_dilated":
            total += _conv_flops(eqn)
        elif name == "cond":
            total += max(matmul_and_conv_flops(branch.jaxpr) for branch in eqn.params["branches"])
        else:
            nested = sum(matmul_and_conv_flops(sub) for value in eqn.params.values() for sub in _sub_jaxprs(value))
            total += nested * (eqn.params["length"] if name == "scan" else 1)
    return total


def matmuls(jaxpr: core.Jaxpr) -> Iterator[core.JaxprEqn]:
    """Every `dot_general` and `conv_general_dilated` equation of `jaxpr`, nested ones included
    (each once, whatever the loop around it): what a precision policy must cover."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
            yield eqn
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                yield from matmuls(sub)


def train_step_flops(config: GMSTConfig, task: str, batch_size: int, *, mask_ratio: float,
                     num_classes: int) -> float:
    """Model FLOPs of one forward + backward pass of `task`'s model on `batch_size` images (the
    optimiser update has no matmul); `config.remat` is ignored: recomputation is not model work."""
    jaxpr = gradients_jaxpr(dataclasses.replace(config, remat="none"), task, batch_size, mask_ratio=mask_ratio,
                            num_classes=num_classes)
    return matmul_and_conv_flops(jaxpr)


def gradients_jaxpr(config: GMSTConfig, task: str, batch_size: int, *, mask_ratio: float,
                    num_classes: int) -> core.Jaxpr:
    """The jaxpr of the train step's forward and backward pass on `batch_size` images, traced from
    shapes (nothing is initialised or compiled)."""
    model, init_inputs, loss_fn, _ = step_benchmark.model_and_loss(
        config, task, mask_ratio=mask_ratio, num_classes=num_classes)
    params, batch_stats = jax.eval_shape(functools.partial(setup.init_variables, model, init_inputs), jax.random.key(0))
    shape = (batch_size, config.img_size, config.img_size, config.in_channels)
    batch = {"image": jax.ShapeDtypeStruct(shape, jnp.float32),
             "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}
    gradients = functools.partial(steps.loss_gradients, loss_fn=loss_fn)
    return jax.make_jaxpr(gradients)(params, batch_stats, batch, jax.random.key(0)).jaxpr


def flops_per_image(config: GMSTConfig, task: str, *, mask_ratio: float, num_classes: int) -> float:
    """`train_step_flops` per image: every counted operation is linear in the batch, so it is
    traced at a batch of two and halved."""
    return train_step_flops(config, task, 2, mask_ratio=mask_ratio, num_classes=num_classes) / 2


def preset_table(presets: Iterable[str], mask_ratio: float, num_classes: int = 18) -> str:
    """Markdown: training GFLOP per image of each preset at its own image size, for dense and sparse
    pretraining and for fine-tuning (`python -m gmae_jax.bench --model_flops`)."""
    lines = ["Training GFLOP per image (forward + backward; matmuls and convolutions, 2 FLOPs a multiply-add):",
             "",
             f"| preset | image px | pretraining, dense | pretraining, sparse at mask {mask_ratio:g} | fine-tuning |",
             "|---|---:|---:|---:|---:|"]
    for preset in presets:
        config = step_benchmark.preset_architecture(preset, "float32")
        counts = [flops_per_image(dataclasses.replace(config, mask_mode=mode), task, mask_ratio=mask_ratio,
                                  num_classes=num_classes) / 1e9
                  for task, mode in (("pretrain", "encoder"), ("pretrain", "sparse"), ("finetune", "encoder"))]
        cells = [f"{count:,.0f}" if count >= 100 else f"{count:.3g}" for count in counts]
        lines.append(f"| {preset} | {config.img_size} | {' | '.join(cells)} |")
    return "\n".join(lines)
