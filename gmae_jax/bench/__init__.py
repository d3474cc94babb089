"""Measurements, not training: the input pipeline, the train step (alone, profiled, against the PyTorch
mirror), the one-call accelerator suite, memory plans for devices this machine lacks, model FLOPs, the
sparse encoder and checkpoint saves. `python -m gmae_jax.bench --help` lists them (`cli.py`)."""
