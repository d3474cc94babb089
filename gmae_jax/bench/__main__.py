"""`python -m gmae_jax.bench`: the benchmarks' command line (`cli.py`). The guard keeps grain's worker
processes, which import this module again, from running it."""

from absl import app, flags

from gmae_jax.bench import cli

__doc__ = cli.__doc__  # what absl's --help prints: the main module's docstring
# --helpshort lists the main module's flags only; the benchmarks' flags are defined in cli.py.
flags.adopt_module_key_flags(cli)

if __name__ == "__main__":
    app.run(cli.main)
