"""The train-step benchmark runs (its numbers go to BENCHMARKS.md, never asserted as speed)."""

from gmae_jax.train.step_benchmark import pretrain_images_per_second


def test_step_benchmark_measures_a_positive_rate():
    assert pretrain_images_per_second("micro", "float32", batch_size=8, num_steps=1) > 0.0
