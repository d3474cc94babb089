"""Every saved array's fingerprint is checked at restore: orbax checks none of an array's bytes, and a
flipped bit on disk restored as other values (-4.4e16 in a weight) without a word."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from gmae_jax.train import checkpoint, fingerprints


def _tree() -> dict:
    rng = np.random.default_rng(0)
    return {"params": {"w": rng.normal(size=(16, 24)).astype(np.float32),
                       "half": rng.normal(size=(8, 3)).astype(jnp.bfloat16)},
            "count": np.int32(7), "flags": np.array([True, False, True])}


def test_a_fingerprint_is_the_same_on_the_host_on_a_device_and_sharded_over_any_mesh(monkeypatch):
    tree = _tree()
    on_host = fingerprints.of(tree)
    assert sorted(on_host) == ["count", "flags", "params/half", "params/w"]
    assert on_host["params/half"].startswith("bfloat16 ")
    monkeypatch.setattr(fingerprints, "_on_host", lambda leaf: not isinstance(leaf, jax.Array))  # as on a GPU
    assert fingerprints.of(jax.tree.map(jnp.asarray, tree)) == on_host
    for shape in ((2, 4), (8, 1), (1, 8)):
        mesh = jax.make_mesh(shape, ("data", "fsdp"))
        sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, PartitionSpec())), tree)
        sharded["params"]["w"] = jax.device_put(tree["params"]["w"], NamedSharding(mesh, PartitionSpec("fsdp", "data")))
        assert not sharded["params"]["w"].sharding.is_fully_replicated or shape == (1, 8)
        assert fingerprints.of(sharded) == on_host


@pytest.mark.parametrize("position", [(0, 0), (3, 17), (15, 23)])
@pytest.mark.parametrize("bit", [0, 13, 31])
def test_any_flipped_bit_changes_its_arrays_fingerprint_and_no_other(position, bit):
    tree = _tree()
    flipped = {**tree, "params": dict(tree["params"])}
    w = tree["params"]["w"].copy()
    w.view(np.uint32)[position] ^= np.uint32(1 << bit)
    flipped["params"]["w"] = w
    assert fingerprints.differing(fingerprints.of(tree), fingerprints.of(flipped)) == ["params/w"]


def test_swapped_elements_change_the_fingerprint():
    tree = _tree()
    w = tree["params"]["w"].copy()
    w[[0, 1]] = w[[1, 0]]
    swapped = {**tree, "params": {**tree["params"], "w": w}}
    assert fingerprints.differing(fingerprints.of(tree), fingerprints.of(swapped)) == ["params/w"]


def test_an_array_restored_into_another_dtype_counts_as_converted_not_damaged():
    saved = fingerprints.of({"w": np.ones(4, np.float32)})
    assert fingerprints.differing(saved, fingerprints.of({"w": np.ones(4, jnp.bfloat16)})) == []


def _saved_step(directory: str, state: dict) -> ocp.CheckpointManager:
    manager = checkpoint.make_manager(directory, max_to_keep=3)
    checkpoint.save(manager, 1, state, None)
    manager.wait_until_finished()
    manager.close()
    return checkpoint.make_manager(directory, max_to_keep=3, read_only=True)


def _restores_unchecked(manager: ocp.CheckpointManager, state: dict) -> dict | None:
    """What orbax alone restores of step 1 (None where it cannot decode the bytes)."""
    try:
        return manager.restore(1, args=ocp.args.Composite(**{checkpoint.STATE_ITEM: ocp.args.StandardRestore(
            jax.tree.map(ocp.utils.to_shape_dtype_struct, state))}))[checkpoint.STATE_ITEM]
    except Exception:  # noqa: BLE001 - bytes orbax cannot decode: not the damage this test is after
        return None


def test_a_bit_flipped_on_disk_inside_an_arrays_data_stops_its_restore_naming_the_array(tmp_path):
    state = {"params": {"w": jnp.arange(5000, dtype=jnp.float32) / 7, "b": jnp.ones(300)}, "step": jnp.int32(3)}
    manager = _saved_step(str(tmp_path / "checkpoints"), state)
    data = max(glob.glob(str(tmp_path / "checkpoints" / "1" / "state" / "**" / "d" / "*"), recursive=True),
               key=os.path.getsize)
    original = open(data, "rb").read()
    for offset in range(len(original) // 2, len(original)):  # the first flip orbax still decodes
        damaged = bytearray(original)
        damaged[offset] ^= 0x40
        open(data, "wb").write(bytes(damaged))
        if (unchecked := _restores_unchecked(manager, state)) is not None:
            break
    assert unchecked is not None
    assert not np.array_equal(unchecked["params"]["w"], state["params"]["w"])  # what orbax alone gives

    with pytest.raises(checkpoint.DamagedArraysError,
                       match=r"^the data of params/w changed on disk since the save$"):
        checkpoint.restore(manager, state, None, 1)
    weights_reader = checkpoint.make_manager(str(tmp_path / "checkpoints"), max_to_keep=3, read_only=True)
    with pytest.raises(checkpoint.DamagedArraysError, match="params/w"):  # what evaluate, predict, export use
        checkpoint.restore_weights(weights_reader, 1,
                                   {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, state["params"])})


def test_a_step_saved_before_fingerprints_restores_unchecked(tmp_path):
    state = {"w": jnp.arange(6.0)}
    manager = _saved_step(str(tmp_path / "checkpoints"), state)
    for path in sorted(glob.glob(str(tmp_path / "checkpoints" / "1" / checkpoint.FINGERPRINTS_ITEM / "*"))):
        os.remove(path)
    os.rmdir(tmp_path / "checkpoints" / "1" / checkpoint.FINGERPRINTS_ITEM)
    np.testing.assert_array_equal(checkpoint.restore(manager, state, None, 1)["w"], np.arange(6.0))


def test_unreadable_fingerprints_count_as_damage(tmp_path):
    state = {"w": jnp.arange(6.0)}
    manager = _saved_step(str(tmp_path / "checkpoints"), state)
    (tmp_path / "checkpoints" / "1" / checkpoint.FINGERPRINTS_ITEM / "metadata").write_text("[1, 2]")
    with pytest.raises(checkpoint.DamagedArraysError, match="fingerprints/ holds no fingerprints"):
        checkpoint.restore(manager, state, None, 1)
