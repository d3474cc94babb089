"""Orbax checkpoints of the train state and the grain iterator, saved side by side so a resumed run
continues with exactly the batches it would have seen."""

from __future__ import annotations

import json
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


def make_manager(directory: str, max_to_keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    return ocp.CheckpointManager(epath.Path(directory), options=options)


class _IteratorSnapshot:
    """The iterator's state frozen at save time. Orbax may run grain's handler on a background
    thread, by which time the train loop has drawn more batches; grain writes `get_state()` bytes
    verbatim, and restores them into the live iterator as JSON."""

    def __init__(self, iterator: Any):
        self._state = json.dumps(iterator.get_state(), indent=1).encode()

    def get_state(self) -> bytes:
        return self._state


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_iterator: Any | None) -> None:
    """Asynchronous save; orbax writes to a temporary folder and renames, so a kill mid-save never
    leaves a checkpoint that looks complete."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(data_iterator))
    manager.save(step, args=ocp.args.Composite(**items))


def restore(
    manager: ocp.CheckpointManager, state_template: Any, data_iterator: Any | None, step: int | None = None
) -> Any:
    """Restores the latest (or given) step onto the layout and shardings of `state_template`.

    The iterator, if given, is restored in place.
    """
    step = manager.latest_step() if step is None else step
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    items = {"state": ocp.args.StandardRestore(abstract)}
    if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    return manager.restore(step, args=ocp.args.Composite(**items))["state"]


def restore_params(directory: str) -> dict[str, Any]:
    """Reads `params` and `batch_stats` of the latest checkpoint in `directory` without a template
    (for initialising fine-tuning from pretraining, whose optimiser state is not wanted)."""
    manager = ocp.CheckpointManager(epath.Path(directory))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"No checkpoint found in {directory}. Point config.init_from at the 'checkpoints' folder "
            "of a pretraining workdir (e.g. WORKDIR/checkpoints)."
        )
    # The saved shardings name the devices of the saving run; on another topology (a pod's
    # checkpoint fine-tuned on one GPU) the arrays land on this process's first device instead.
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=local)))
    state = restored["state"]
    return {"params": state["params"], "batch_stats": state["batch_stats"], "step": step}
