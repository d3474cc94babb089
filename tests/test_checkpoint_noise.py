"""A restore that fails part-way leaves orbax's other reads in flight; what they print when they end
late must not bury the one-line error (the damaged-checkpoint tests in test_train.py see this only
when the timing is unlucky, so it is checked here on its own, in a fresh interpreter)."""

import subprocess
import sys

SCRIPT = """
import asyncio, gc
from gmae_jax.train import orbax_noise

async def failing_read():
    raise OSError("byte range not valid")

async def unstarted_read():
    pass

class Pending:
    def __await__(self):
        yield

async def read_failing_when_collected():  # what orbax's _read_array_index_and_device_put does
    try:
        await Pending()
    finally:
        raise Exception("Encountered error while reading array index: (slice(0, 8, 1),). See full TensorStore")

try:
    with orbax_noise.quiet_abandoned_reads():
        raise OSError("step 6 is damaged")
except OSError:
    pass
loop = asyncio.new_event_loop()
task = loop.create_task(failing_read())  # ends with nobody awaiting it
loop.run_until_complete(asyncio.sleep(0.01))
loop.close()
del task
pending = unstarted_read()  # never awaited
del pending
started = read_failing_when_collected()
started.send(None)  # suspended in its read
del started  # collected: its close() raises in the coroutine, an "Exception ignored in"
gc.collect()
{after}
"""


def _stderr(after: str = "") -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT.format(after=after)], capture_output=True, text=True,
                          check=True).stderr


def test_reads_abandoned_by_a_failed_restore_print_nothing():
    assert _stderr() == ""


def test_other_errors_still_print():
    stderr = _stderr("import logging; logging.getLogger('asyncio').error('a real asyncio problem')")
    assert stderr.strip().endswith("a real asyncio problem")  # logged as usual


def test_a_restore_that_succeeds_leaves_no_filter_behind():
    script = ("import logging, sys, warnings\nfrom gmae_jax.train import orbax_noise\n"
              "hook, filters = sys.unraisablehook, list(warnings.filters)\n"
              "with orbax_noise.quiet_abandoned_reads():\n    pass\n"
              "assert sys.unraisablehook is hook and warnings.filters == filters\n"
              "assert logging.getLogger('asyncio').filters == []\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_filters_left_by_failed_restores_are_installed_once():
    script = ("import logging, sys, warnings\nfrom gmae_jax.train import orbax_noise\n"
              "def fail():\n    try:\n        with orbax_noise.quiet_abandoned_reads():\n"
              "            raise OSError('damaged')\n    except OSError:\n        pass\n"
              "fail()\nhook, filters = sys.unraisablehook, list(warnings.filters)\n"
              "fail()\nwith orbax_noise.quiet_abandoned_reads():\n    pass\n"
              "assert sys.unraisablehook is hook and warnings.filters == filters\n"
              "assert len(logging.getLogger('asyncio').filters) == 1\n")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_failed_array_reads_reason_leaves_out_the_method_repr_orbax_appends():
    from gmae_jax.train import checkpoint

    error = Exception("Encountered error while reading array index: (slice(0, 132, 1), slice(0, 32, 1)). See full "
                      "TensorStore details: <bound method PyCapsule.spec of TensorStore({'driver': 'zarr3'})>")
    assert checkpoint.reason(error) == ("Exception: Encountered error while reading array index: (slice(0, 132, 1), "
                                        "slice(0, 32, 1)).")
