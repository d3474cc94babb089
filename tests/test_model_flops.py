"""Model FLOPs counted from the jaxpr (the device suite's MFU): exact for single layers, nested
jaxprs followed, and in line with XLA:CPU's own count (which, unlike XLA:GPU's, sees convolutions)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from gmae_jax.bench import model_flops, step_benchmark
from gmae_jax.train import steps


def _gradient_flops(loss, *args) -> float:
    return model_flops.matmul_and_conv_flops(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(*args).jaxpr)


def test_a_dense_layer_costs_three_matmuls_forward_and_backward():
    x, w = jnp.ones((16, 24)), jnp.ones((24, 40))
    assert _gradient_flops(lambda x, w: jnp.sum(x @ w), x, w) == 3 * 2 * 16 * 24 * 40


@pytest.mark.parametrize("dilation", [1, 3])
def test_a_convolution_costs_three_convolutions_forward_and_backward(dilation):
    x, k = jnp.ones((2, 8, 8, 6)), jnp.ones((3, 3, 6, 5))

    def loss(x, k):
        return jnp.sum(jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", rhs_dilation=(dilation, dilation),
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC")))

    # Input and kernel gradients are convolutions of the forward's size, in other roles.
    assert _gradient_flops(loss, x, k) == 3 * 2 * (2 * 8 * 8 * 5) * (3 * 3 * 6)


def test_nested_jaxprs_count_scans_by_length_and_conds_by_their_costliest_branch():
    x, w = jnp.ones((4, 8)), jnp.ones((8, 8))

    def scanned(x, w):
        return jax.lax.scan(lambda h, _: (h @ w, None), x, None, length=5)[0]

    def branching(x, w):
        return jax.lax.cond(x.sum() > 0, lambda: (x @ w) @ w, lambda: x @ w)

    one = 2 * 4 * 8 * 8
    count = model_flops.matmul_and_conv_flops
    assert count(jax.make_jaxpr(jax.jit(scanned))(x, w).jaxpr) == 5 * one
    assert count(jax.make_jaxpr(branching)(x, w).jaxpr) == 2 * one


def test_a_models_count_agrees_with_xla_cpus_and_ignores_remat(task="pretrain"):
    config = dataclasses.replace(step_benchmark.preset_architecture("micro", "float32"), depth=1, decoder_depth=1)
    counted = model_flops.train_step_flops(config, task, 8, mask_ratio=0.75, num_classes=4)
    model, init_inputs, loss_fn, _ = step_benchmark.model_and_loss(config, task, mask_ratio=0.75, num_classes=4)
    variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(0)}, *init_inputs, train=False)
    batch = {"image": jnp.zeros((8, 32, 32, 3)), "label": jnp.zeros((8,), jnp.int32)}
    gradients = jax.jit(functools.partial(steps.loss_gradients, loss_fn=loss_fn))
    cost = gradients.lower(variables["params"], variables["batch_stats"], batch, jax.random.key(0)).compile()
    cost = cost.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # XLA:CPU counts elementwise work too and leaves out kernel taps that fall on padding.
    assert 0.9 * counted < cost["flops"] < 1.05 * counted
    rematerialised = dataclasses.replace(config, remat="block")
    assert model_flops.train_step_flops(rematerialised, task, 8, mask_ratio=0.75, num_classes=4) == counted


def test_the_preset_table_lists_each_count():
    title, blank, *table = model_flops.preset_table(["micro"], mask_ratio=0.75).splitlines()
    assert title.startswith("Training GFLOP per image (forward + backward") and not blank  # the cells' unit
    assert table[0].startswith("| preset | image px | pretraining, dense")
    cells = [cell.strip() for cell in table[2].strip("|").split("|")]
    config = step_benchmark.preset_architecture("micro", "float32")
    dense = model_flops.train_step_flops(config, "pretrain", 2, mask_ratio=0.75, num_classes=18) / 2e9
    sparse = model_flops.train_step_flops(dataclasses.replace(config, mask_mode="sparse"), "pretrain", 2,
                                          mask_ratio=0.75, num_classes=18) / 2e9
    assert cells[:2] == ["micro", "32"]
    assert float(cells[2]) == pytest.approx(dense, rel=1e-2) and float(cells[3]) == pytest.approx(sparse, rel=1e-2)
    assert sparse < 0.6 * dense  # the sparse encoder computes on a quarter of the tokens
