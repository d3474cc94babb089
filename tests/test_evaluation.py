"""One evaluation pass on the 8-device mesh: what each example's outputs come back with."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gmae_jax.data import synthetic, sources
from gmae_jax.schema import DataConfig
from gmae_jax.train import evaluation, sharding, tasks


def test_the_eval_step_returns_each_examples_label_and_place_without_a_gather_of_its_own(tmp_path, monkeypatch):
    """The columns come whole from the step's own program: a separate cross-process gather per batch ran
    beside the next batch's step, whose collectives XLA:CPU may order differently on each process."""
    synthetic.write_demo_dataset(str(tmp_path), image_size=32, train_per_class=1, val_per_class=5,
                                 classes=("fist", "palm"))
    _, _, val = sources.open_sources(DataConfig(root=str(tmp_path)))
    mesh = sharding.make_mesh()
    assert mesh.size == 8  # 10 images: two batches of 8, the second mostly padding

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation gathered a batch column in a program of its own")

    monkeypatch.setattr(multihost_utils, "process_allgather", refuse)
    monkeypatch.setattr(sharding, "to_host", refuse)
    task = tasks.Task("count", loss_fn=None, summarize=lambda sums, outputs: sums, draw=None,
                      eval_step=lambda state, batch: {"count": jnp.sum(batch["valid"]),
                                                      "doubled": 2 * batch["index"] * state["scale"]})
    state = jax.device_put({"scale": jnp.int32(1)}, sharding.replicated(mesh))
    metrics, outputs = evaluation.evaluate(task, evaluation.compile_eval_step(task, mesh, state), state, val,
                                           image_size=32, batch_size=8, num_workers=0, mesh=mesh)
    assert metrics == {"count": 10.0}
    np.testing.assert_array_equal(outputs["index"], np.arange(10))  # padding left out, split order kept
    np.testing.assert_array_equal(outputs["doubled"], 2 * np.arange(10))
    assert sorted(outputs["label"].tolist()) == [0] * 5 + [1] * 5
    assert set(outputs) == {"index", "label", "doubled"}
