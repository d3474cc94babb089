"""Test setup: 8 simulated CPU devices (as CI runs), quick XLA compiles, and parsed absl flags (grain
workers need them)."""

import os

# Backend optimisation level 0: LLVM skips the optimisations that make a compiled step run faster
# but take ~30 % of each compile; tests compile far more than they run (a few steps per program),
# and the same programs compute the same numbers to float32 rounding. At that level XLA:CPU's older
# elementwise emitters (fusion emitters off) compile faster still: the suite 845 -> 634 s on an
# idle 2-core VM, ~10 s of it from one device-suite case fewer (at the default level they compile
# and run slower, so only tests use them).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                      "--xla_cpu_use_fusion_emitters=false")

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
    # Every program, however quick to compile: the entry-point subprocesses and each new run in this
    # process otherwise compile the small ones (init, evaluation, summaries) again.
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker more than the cores. Many tests spend their time waiting on entry-point
    subprocesses (multi-process jobs, preemption, the demo), which leaves a core idle with one worker
    per core: 3 workers ran the suite in 932 s where 2 took 1034 s on the 2-core VM (pyproject.toml)."""
    return (os.cpu_count() or 1) + 1
