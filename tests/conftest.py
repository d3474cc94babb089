"""Test setup: 8 simulated CPU devices (as CI runs) and parsed absl flags (grain workers need them)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

# One JAX persistent compilation cache for the whole session, this process and the entry-point
# subprocesses the tests start (they inherit the environment): many tests train the same tiny
# models, and compiling them again is most of the suite's time. Fresh per session, so no test ever
# sees a program compiled by other code.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="gmae_jax_test_compile_cache_")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
