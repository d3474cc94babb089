"""Test helper: the weights a run saved, read without its config (stages use `setup.restore_run`)."""

from typing import Any

from etils import epath
import jax
import orbax.checkpoint as ocp


def restore_params(directory: str) -> dict[str, Any]:
    """`params`, `batch_stats` and `step` of the latest checkpoint in `directory`, onto one device
    (the saved shardings name the saving run's devices, which a test on another mesh lacks)."""
    manager = ocp.CheckpointManager(epath.Path(directory))
    step = manager.latest_step()
    if step is None:
        raise FileNotFoundError(f"No checkpoint found in {directory}.")
    local = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(fallback_sharding=local)))
    state = restored["state"]
    return {"params": state["params"], "batch_stats": state["batch_stats"], "step": step}
