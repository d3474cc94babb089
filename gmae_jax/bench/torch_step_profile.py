"""Where the eager PyTorch mirror's train step spends its time, in the same kinds of work as
`gmae_jax.bench.step_profile` uses for the JAX step, so the two can sit in one table
(`python -m gmae_jax.bench --profile_step --vs_torch`). Self time of each aten op from
`torch.profiler` (CPU time on CPU, kernel time on a CUDA device). Imports torch (the `[torch]` extra).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# aten op (without the 'aten::' prefix, trailing '_' and '.overload') -> kind; everything else
# a step runs is elementwise (GELU, dropout, AdamW's arithmetic, ...).
_KINDS = {
    "convolution": re.compile(r"conv|mkldnn_convolution"),
    "matmul": re.compile(r"^(mm|addmm|bmm|baddbmm|matmul|linear|_scaled_dot_product.*|gemm.*)$"),
    "reduction": re.compile(r"batch_norm|layer_norm|^(sum|mean|amax|amin|max|min|all|any|norm|_softmax.*|"
                            r"softmax.*|_log_softmax.*|var_mean|_foreach_norm)$"),
    "data movement": re.compile(r"^(copy|_to_copy|cat|clone|contiguous|index_select|gather|scatter|"
                                r"constant_pad_nd|_unsafe_view|stack)$"),
}


def aten_kind(name: str) -> str | None:
    """The kind of work of a profiled aten op; None for anything else the profiler lists (autograd
    and optimiser frames, and on CUDA the kernels, whose time their aten op already counts)."""
    if not name.startswith("aten::"):
        return None
    op = name.removeprefix("aten::").split(".")[0].rstrip("_")
    for kind, pattern in _KINDS.items():
        if pattern.search(op):
            return kind
    return "elementwise"


def kind_ms(step: Callable[[], object], num_steps: int = 3) -> dict[str, float]:
    """Milliseconds per step by kind of work of `step()` (one eager optimiser step; call it a few
    times before, so that allocator warm-up and oneDNN / cuDNN plan selection are not traced)."""
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(num_steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    totals: collections.Counter[str] = collections.Counter()
    for event in prof.key_averages():
        kind = aten_kind(event.key)
        if kind is not None:
            microseconds = event.self_device_time_total if cuda else event.self_cpu_time_total
            totals[kind] += microseconds / 1e3 / num_steps
    return dict(totals)
