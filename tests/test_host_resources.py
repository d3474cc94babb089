"""What a host gives a run: cores for workers, memory for a batch."""

import pytest

from gmae_jax import host_resources
from gmae_jax.data import pipeline, sources
from gmae_jax.train import evaluation, sharding


def test_a_batch_beyond_the_hosts_memory_is_one_line(monkeypatch):
    monkeypatch.setattr(host_resources, "physical_memory", lambda: 24 * 2**30)
    host_resources.check_batch_fits(64, 224, 1, on_cpu=True)
    with pytest.raises(host_resources.ConfigError) as refused:
        host_resources.check_batch_fits(10**8, 32, 1, on_cpu=True)
    assert str(refused.value) == ("config.batch_size=100000000: one batch of 32 px images needs 1431 GiB of this "
                                  "host's memory, which has 24 GiB; use a batch far below 1677721")
    # Split over 4 hosts, each holds a quarter; off CPU the float copy is on the accelerator.
    host_resources.check_batch_fits(4 * 10**6, 32, 4, on_cpu=False)
    monkeypatch.setattr(host_resources, "physical_memory", lambda: None)
    host_resources.check_batch_fits(10**8, 32, 1, on_cpu=True)


def test_an_evaluation_batch_is_cut_to_the_split(monkeypatch):
    """Its metrics do not depend on the batch: a larger one would allocate padding (an evaluate stage
    with --config.batch_size=100000000 on 4 images allocated until it was killed)."""
    asked = []

    class Asked(Exception):
        pass

    def make_eval_dataset(examples, *, global_batch_size, **kwargs):
        asked.append(global_batch_size)
        raise Asked

    monkeypatch.setattr(pipeline, "make_eval_dataset", make_eval_dataset)
    mesh = sharding.make_mesh()
    for batch_size, num_examples in ((10**8, 5), (2 * mesh.size, 40)):
        with pytest.raises(Asked):
            evaluation.evaluate(None, None, None, sources.Source([object()] * num_examples), image_size=32,
                                batch_size=batch_size, num_workers=0, mesh=mesh)
    assert asked == [sharding.whole_rows(5, mesh), 2 * mesh.size]
