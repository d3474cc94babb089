"""Parallelism: every mesh and step implementation trains to the same numbers as one device, large
arrays really are split, and checkpoints move between meshes."""

import functools
import os
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from gmae_jax import config_lib
from gmae_jax.data import pipeline
from gmae_jax.models.gmae import GMAE, GMAEClassifier
from gmae_jax.models.presets import gmst_config
from gmae_jax.bench import step_benchmark
from gmae_jax.train import checkpoint, sharding, steps, trainer

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
# Small enough that most of the micro model's kernels are split, so parity covers real FSDP.
SMALL_FSDP_SIZE = 2**8


def stage_setup(stage: str, **model_overrides):
    config = config_lib.load_sibling_config(os.path.join(CONFIGS, "x.py"), stage, "runlocal")
    config.model.attention_dropout = 0.0  # dropout masks are drawn per shard layout; keep it exact
    config.model.depth = 1  # one block of each kind: every code path, half the compile time
    config.model.update(model_overrides)
    gmst = gmst_config(config.model)
    image = jnp.zeros((1, gmst.img_size, gmst.img_size, 3))
    if stage == "pretrain":
        model = GMAE(gmst)
        init_inputs = (image, jnp.zeros((1, gmst.num_patches), bool))
        loss_fn = functools.partial(steps.pretrain_loss, model=model, mask_ratio=0.6, norm_pix_loss=False)
    else:
        model = GMAEClassifier(gmst, 4)
        init_inputs = (image,)
        loss_fn = functools.partial(steps.classifier_loss, model=model, label_smoothing=0.1)
    return config, model, init_inputs, loss_fn


def batches(n, size, num_classes=4, batch_size=16, repeat=False):
    """n random batches as the input pipeline yields them (uint8 pixels, each row's colour jitter for
    the step to apply), or one batch n times (`repeat`, where a falling loss is the check)."""
    made = [step_benchmark.pipeline_batch(batch_size, size, num_classes, seed=seed)
            for seed in range(1 if repeat else n)]
    return made * n if repeat else made


class Trained(NamedTuple):
    params: Any
    batch_stats: Any
    losses: list[float]
    state: Any
    # AdamW moves parameters the same for gradients off by a constant factor; their norm does not.
    grad_norms: list[float]


def run_steps(stage, mesh_shape=(1, 1), impl="jit", accum_steps=1, num_batches=3, loss_fn=None,
              repeat=False, lr=None, **model_overrides):
    """Trains a few steps. The default small learning rate keeps parity exact: AdamW's first steps
    move every parameter by ~lr whatever its gradient, so float noise in the zero gradients of conv
    biases before a BatchNorm would flip signs at a large one. `lr` is for loss-falls checks."""
    config, model, init_inputs, default_loss = stage_setup(stage, **model_overrides)
    if lr is not None:
        config.optim.update(lr=lr, warmup_steps=0)
    data, fsdp = mesh_shape
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)),
                              jax.devices()[: data * fsdp])
    state, _ = trainer.create_state(model, init_inputs, config, mesh, steps_total=10)
    step = sharding.make_train_step(impl, loss_fn or default_loss, mesh, state, accum_steps)
    losses, grad_norms = [], []
    for batch in batches(num_batches, config.model.img_size, repeat=repeat):
        state, metrics = step(state, sharding.global_batch(batch, mesh), jax.random.key(0))
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return Trained(jax.device_get(state.params), jax.device_get(state.batch_stats), losses, state, grad_norms)


@functools.cache
def one_device(stage):
    return run_steps(stage)


def assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("stage, mesh_shape, impl", [
    ("pretrain", (2, 4), "jit"), ("pretrain", (1, 8), "jit"), ("pretrain", (2, 4), "shard_map"),
    ("finetune", (8, 1), "jit"),
])
def test_every_mesh_and_step_trains_like_one_device(stage, mesh_shape, impl, monkeypatch):
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", SMALL_FSDP_SIZE)
    params, batch_stats, losses, _, grad_norms = run_steps(stage, mesh_shape, impl)
    want_params, want_stats, want_losses, _, want_grad_norms = one_device(stage)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-4)
    np.testing.assert_allclose(grad_norms, want_grad_norms, rtol=1e-4)
    assert want_losses[0] != want_losses[-1]  # it actually trained
    assert_trees_close(params, want_params)
    assert_trees_close(batch_stats, want_stats)


def test_fsdp_splits_large_parameters_and_their_optimizer_state(monkeypatch):
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", SMALL_FSDP_SIZE)
    config, model, init_inputs, _ = stage_setup("finetune")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    state, _ = trainer.create_state(model, init_inputs, config, mesh, steps_total=10)
    fc1 = state.params["encoder"]["blocks_0"]["mscffn"]["fc1"]["kernel"]  # (33, 132)
    assert fc1.shape == (33, 132)
    assert {shard.data.shape for shard in fc1.addressable_shards} == {(33, 33)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == fc1.shape]
    assert len(moments) >= 2 and all(x.sharding == fc1.sharding for x in moments)  # AdamW mu, nu
    small = state.params["encoder"]["blocks_0"]["gamma1"]
    assert {shard.data.shape for shard in small.addressable_shards} == {small.shape}  # replicated
    replicated_bytes = sum(x.nbytes for x in jax.tree.leaves(state.params))
    assert sharding.bytes_per_device(state.params) < 0.5 * replicated_bytes


def test_fsdp_on_one_device_of_eight_splits_odd_widths_as_far_as_they_divide(monkeypatch):
    """fsdp=8 is laid out as three axes of 2, so the micro model's fc1 (33 x 132: no dimension divides
    by 8) is split four ways instead of kept whole, and its AdamW moments with it."""
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", SMALL_FSDP_SIZE)
    config, model, init_inputs, _ = stage_setup("finetune")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
    assert dict(mesh.shape) == {"data": 1, "fsdp_0": 2, "fsdp_1": 2, "fsdp_2": 2}
    assert sharding.describe(mesh) == "data=1 x fsdp=8 (axes fsdp_0=2 x fsdp_1=2 x fsdp_2=2)"
    state, _ = trainer.create_state(model, init_inputs, config, mesh, steps_total=10)
    fc1 = state.params["encoder"]["blocks_0"]["mscffn"]["fc1"]["kernel"]
    assert fc1.shape == (33, 132)
    assert {shard.data.shape for shard in fc1.addressable_shards} == {(33, 33)}
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.shape == fc1.shape]
    assert len(moments) >= 2 and all(x.sharding == fc1.sharding for x in moments)
    fc2 = state.params["encoder"]["blocks_0"]["mscffn"]["fc2"]["kernel"]  # 8 divides its 32 outputs: 8 ways
    assert fc2.shape == (132, 32) and {shard.data.shape for shard in fc2.addressable_shards} == {(132, 4)}


def test_shard_map_step_gathers_split_parameters_and_reduce_scatters_their_gradients(monkeypatch):
    """Under FSDP the shard_map step takes each device's shards, not the whole parameters: its program
    all-gathers every split parameter once and reduce-scatters its gradient (whole gradients never
    leave a device); parity with one device is test_every_mesh_and_step_trains_like_one_device."""
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", SMALL_FSDP_SIZE)
    config, model, init_inputs, loss_fn = stage_setup("pretrain")
    mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=8)))
    state, _ = trainer.create_state(model, init_inputs, config, mesh, steps_total=10)
    split = [x for x in jax.tree.leaves(state.params) if not x.sharding.is_fully_replicated]
    assert len(split) >= 10
    step = sharding.make_train_step("shard_map", loss_fn, mesh, state)
    batch = sharding.global_batch(batches(1, config.model.img_size)[0], mesh)
    program = step.lower(state, batch, jax.random.key(0)).as_text()
    assert program.count("stablehlo.all_gather") == len(split)
    assert program.count("stablehlo.reduce_scatter") == len(split)


def test_fsdp_spec_picks_the_largest_divisible_dimension_then_the_factors_that_divide():
    P = jax.sharding.PartitionSpec
    assert sharding.fsdp_spec((3, 3, 64, 96), 4) == P(None, None, None, ("fsdp_0", "fsdp_1"))
    assert sharding.fsdp_spec((3, 3, 64, 90), 4) == P(None, None, ("fsdp_0", "fsdp_1"))
    assert sharding.fsdp_spec((3, 3, 64, 90), 2) == P(None, None, None, "fsdp")  # a prime: one axis
    assert sharding.fsdp_spec((65, 3, 3, 65), 4) == P()  # nothing divides
    assert sharding.fsdp_spec((8,), 4) == P()  # too small to split
    assert sharding.fsdp_spec((512, 512), 1) == P()
    # 8 divides neither 513 nor 2052 = 4 x 513: four of the eight ways, replicated over the third axis.
    assert sharding.fsdp_spec((513, 2052), 8) == P(None, ("fsdp_0", "fsdp_1"))
    assert sharding.split_ways(P(None, ("fsdp_0", "fsdp_1")), 8) == 4
    # 12 = 2 x 2 x 3 divides neither dimension of (6, 1000): 6 takes 2 x 3 (1000 would take 2 x 2).
    assert sharding.fsdp_spec((6, 1000), 12) == P(("fsdp_0", "fsdp_2"))
    assert sharding.split_ways(sharding.fsdp_spec((6, 1000), 12), 12) == 6
    # One dimension only, the output features of equals: split on its input features too, a kernel made
    # XLA replicate the activation it multiplies.
    assert sharding.fsdp_spec((1, 1, 258, 258), 8) == P(None, None, None, "fsdp_0")
    assert sharding.fsdp_axes(12) == {"fsdp_0": 2, "fsdp_1": 2, "fsdp_2": 3}
    assert sharding.fsdp_axes(7) == {"fsdp": 7} and sharding.fsdp_axes(1) == {"fsdp": 1}


def test_arrays_fsdp_splits_less_are_a_warning_with_the_fsdp_that_holds_least():
    """G-MAE's MSC-FFN sizes (2 x width + 1 and multiples: 513 x 2052 in `small`) have no dimension that 8
    divides; fsdp=8 splits them four ways, and where no divisor does better the warning suggests none."""
    params = {"fc1": jax.ShapeDtypeStruct((513, 2052), np.float32),
              "proj": jax.ShapeDtypeStruct((512, 512), np.float32)}
    state = {"params": params, "adam_mu": params}
    assert sharding.fsdp_split_less_warning(state, params, 8, 8) == (
        "config.mesh.fsdp=8 splits an array only as far as its dimensions divide: 2.0 MB a device of parameters "
        "and optimiser state are split fewer than 8 ways (2 array(s), e.g. params fc1 (513, 2052): 4 ways), "
        "2.3 MB a device in all")
    assert sharding.fsdp_split_less_warning(state, params, 4, 8) is None  # 2052 and 512 divide by 4
    assert sharding.fsdp_split_less_warning(state, params, 1, 8) is None  # no FSDP asked for
    # 3 divides 2052 only: fsdp=3 of 6 devices keeps the 512 x 512s whole; fsdp=6 splits everything 2 ways or more.
    warning = sharding.fsdp_split_less_warning(state, params, 3, 6)
    assert warning == (
        "config.mesh.fsdp=3 splits an array only as far as its dimensions divide: 2.0 MB a device of parameters "
        "and optimiser state are split fewer than 3 ways (2 array(s), e.g. params proj (512, 512): whole), "
        "4.7 MB a device in all; --config.mesh.fsdp=6 would hold 2.3 MB a device")
    odd = {"fusion": jax.ShapeDtypeStruct((1, 1, 513, 513), np.float32), "proj": params["proj"]}
    warning = sharding.fsdp_split_less_warning(odd, odd, 2, 2)  # no fsdp holds less: nothing to suggest
    assert warning == ("config.mesh.fsdp=2 splits an array only as far as its dimensions divide: 1.0 MB a device "
                       "of parameters and optimiser state are split fewer than 2 ways (1 array(s), e.g. params "
                       "fusion (1, 1, 513, 513): whole), 1.5 MB a device in all")


@pytest.mark.parametrize("data, fsdp, message", [
    (3, -1, "config.mesh.data=3 does not divide the 8 devices of this job"),
    (-1, 3, "config.mesh.fsdp=3 does not divide the 8 devices of this job"),
    (2, 2, "must equal the 8 devices"),
    (-1, -1, r"config.mesh.fsdp=-1 fills the devices, and so does config.mesh.data \(its default, -1\): set it, "
             r"e.g. --config.mesh.data=1 for FSDP over all 8 devices"),
    (0, 8, r"config.mesh.data=0 must be a positive number of devices, or -1 to fill the rest"),
    (-2, -1, r"config.mesh.data=-2 must be a positive number of devices, or -1 to fill the rest"),
    (8, 0, r"config.mesh.fsdp=0 must be a positive number of devices, or -1 to fill the rest"),
])
def test_mesh_shapes_that_do_not_fit_are_clear_errors(data, fsdp, message):
    with pytest.raises(sharding.MeshError, match=message):
        sharding.make_mesh(ml_collections.ConfigDict(dict(data=data, fsdp=fsdp)))


def test_checkpoint_written_on_one_mesh_restores_on_another(tmp_path, monkeypatch):
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", SMALL_FSDP_SIZE)
    saved = run_steps("finetune", (8, 1), num_batches=1).state
    manager = checkpoint.make_manager(str(tmp_path), 2)
    batches = grain.MapDataset.range(40).batch(4)
    iterator = pipeline.TrainBatches(batches, num_workers=0)
    next(iterator), next(iterator)
    sliced = []
    slice_in_dim = jax.lax.slice_in_dim
    monkeypatch.setattr(jax.lax, "slice_in_dim", lambda *args, **kw: sliced.append(1) or slice_in_dim(*args, **kw))
    checkpoint.save(manager, 1, saved, iterator)
    manager.wait_until_finished()
    # One process writes every byte: its replicated arrays are written whole, not first cut into a
    # slice per device (orbax's replica-parallel saving, a compiled slice per shape and device).
    assert not sliced
    # As if two processes had saved it: the iterator's files name the process count.
    data = tmp_path / "1" / checkpoint.DATA_ITEM
    state = (data / "process_0-of-1.json").read_bytes()
    (data / "process_0-of-1.json").unlink()
    for index in range(2):
        (data / f"process_{index}-of-2.json").write_bytes(state)

    config, model, init_inputs, _ = stage_setup("finetune")
    other = sharding.make_mesh(ml_collections.ConfigDict(dict(data=2, fsdp=4)))
    template, _ = trainer.create_state(model, init_inputs, config, other, steps_total=10)
    resumed = pipeline.TrainBatches(batches, num_workers=0)
    restored = checkpoint.restore(checkpoint.make_manager(str(tmp_path), 2), template, resumed)
    for got, want, like in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), jax.tree.leaves(template)):
        assert got.sharding == like.sharding
        np.testing.assert_array_equal(jax.device_get(got), jax.device_get(want))
    np.testing.assert_array_equal(next(resumed), batches[2])  # the input continues where it stopped


@pytest.mark.parametrize("remat", ["block", "fine"])
def test_remat_gives_the_same_numbers(remat):
    params, batch_stats, losses, *_ = run_steps("pretrain", remat=remat)
    want_params, want_stats, want_losses, *_ = one_device("pretrain")
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    assert_trees_close(params, want_params)
    assert_trees_close(batch_stats, want_stats)


def test_bfloat16_compute_trains_with_float32_parameters():
    params, batch_stats, losses, state, _ = run_steps("pretrain", num_batches=3, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {np.dtype("float32")}
    assert {x.dtype for x in jax.tree.leaves(batch_stats)} == {np.dtype("float32")}
    float32_losses = one_device("pretrain").losses
    np.testing.assert_allclose(losses, float32_losses, rtol=0.05)  # the same steps, coarser numbers
    assert losses[0] != losses[-1]


def running_average_loss(params, batch_stats, batch, rng, *, model):
    """Cross-entropy with BatchNorm on its running averages: the same statistics for any split."""
    del rng
    logits = model.apply({"params": params, "batch_stats": batch_stats}, steps.train_images(batch), train=False)
    loss = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None], axis=1))
    return loss, ({"loss": loss}, batch_stats)


@pytest.mark.parametrize("impl, mesh_shape, accumulating_mesh_shape", [
    ("jit", (8, 1), (2, 1)),
    ("shard_map", (4, 2), (1, 2)),  # FSDP: each micro-batch gathers the parameters again
])
def test_accumulated_micro_batches_equal_one_large_batch(impl, mesh_shape, accumulating_mesh_shape, monkeypatch):
    monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", SMALL_FSDP_SIZE)
    _, model, _, _ = stage_setup("finetune")
    loss_fn = functools.partial(running_average_loss, model=model)
    # The default small learning rate (see run_steps): at 1e-3 the float noise of a near-zero gradient
    # (summed in another order by the micro-batches) flipped one bias's AdamW step.
    params, _, losses, _, grad_norms = run_steps("finetune", mesh_shape, impl, loss_fn=loss_fn, repeat=True)
    accumulated, _, accumulated_losses, _, accumulated_grad_norms = run_steps(
        "finetune", accumulating_mesh_shape, impl, accum_steps=4, loss_fn=loss_fn, repeat=True)
    np.testing.assert_allclose(accumulated_losses, losses, rtol=1e-5)
    np.testing.assert_allclose(accumulated_grad_norms, grad_norms, rtol=1e-4)
    assert losses[-1] < losses[0]
    assert_trees_close(accumulated, params)


def test_accumulation_trains_the_pretraining_model():
    _, _, losses, state, _ = run_steps("pretrain", (2, 1), accum_steps=4, num_batches=3, repeat=True, lr=2e-3)
    assert int(state.step) == 3 and losses[-1] < losses[0]


def test_micro_batches_are_strided_so_every_device_keeps_rows():
    batch = {"x": np.arange(8)}
    np.testing.assert_array_equal(steps.micro_batches(batch, 2)["x"], [[0, 2, 4, 6], [1, 3, 5, 7]])
