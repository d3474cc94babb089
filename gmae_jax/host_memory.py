"""Keep freed host memory inside the process, so XLA:CPU's per-step buffers stop costing page faults.

Each execution of a compiled XLA:CPU step allocates its temporaries as one block (331 MB for the
`mini` pretraining step at batch 64) from the thread that runs it. glibc serves such a request with a
fresh `mmap` from a per-thread arena and unmaps it on free, so every step first-touches all of it
again: ~80k page faults and ~40 % extra (kernel) CPU time per step on the project's 2-core VM. One
arena, no `mmap` and no trimming make glibc hand the same memory back every step.

The settings are `mallopt` calls: they must run before JAX starts its threads (the first use of a
backend), which is why entry points call `keep_freed_memory()` first thing. The cost is that the
process keeps its peak heap until it exits, which is what a training process does anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

# <malloc.h> parameter numbers.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Makes glibc reuse freed memory instead of returning it to the kernel. Returns False (and
    changes nothing) where the C library is not glibc; safe to call more than once."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    applied = all(mallopt(ctypes.c_int(option), ctypes.c_int(value)) == 1 for option, value in settings)
    if not applied:
        logging.warning("mallopt refused a setting; XLA:CPU steps keep paying page faults")
    return applied
