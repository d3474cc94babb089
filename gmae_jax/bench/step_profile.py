"""Where a compiled train step spends its time: a `jax.profiler` trace of a few steps, each traced op
joined with the optimised HLO it ran (`compiled.as_text()`) and summed by kind of work (matmul,
convolution, reduction, elementwise, ...; with the bytes its ops read and write, so a memory-bound
kind's rate can be held against the device's bandwidth), by phase (forward, backward, optimiser) and
by layer.

The same code reads a CPU trace (XLA:CPU's thunks) and a GPU or TPU one (device kernels): every
traced op names its HLO instruction and module in its `hlo_op` / `hlo_module` arguments. This is
what `python -m gmae_jax.bench --profile_step` prints and what the device suite adds after its table,
so that the next speed change starts from measured shares instead of guesses.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import math
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

KINDS = ("matmul", "convolution", "reduction", "elementwise", "data movement", "communication", "other")
PHASES = ("forward", "backward", "optimiser and other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.*?)\s(?P<opcode>[a-z][\w\-]*)\("
                          r"(?P<operands>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_DATA_MOVEMENT = {"copy", "transpose", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice",
                  "pad", "gather", "scatter", "broadcast", "reshape", "bitcast", "copy-start", "copy-done"}
# A while loop's or call's traced time spans the ops in its body, which are traced themselves.
_CONTAINERS = {"while", "conditional", "call"}
CONTAINER = "control flow (its body's ops count)"
# XLA:GPU's CUDA graphs show in a trace under this name; the flag (an empty list) turns them off.
COMMAND_BUFFER = "command_buffer"
NO_COMMAND_BUFFERS = "--xla_gpu_enable_command_buffer="
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_CONTROL_FLOW = {"while", "body", "cond", "closed_call", "checkpoint", "remat", "rematted_computation"}
# Bytes per element of XLA's types (4-bit types rounded up; tokens move nothing).
_ELEMENT_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
                  "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b(pred|[suf]\d+|bf16|c64|c128|f8\w*)\[([\d,]*)\]")
_ELEMENTWISE_HINT = {"add", "multiply", "subtract", "divide", "exponential", "erf", "tanh", "maximum",
                     "select", "compare", "convert", "rsqrt", "sqrt", "logistic", "negate", "power"}


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One top-level instruction of the optimised program, as a profile groups it."""

    kind: str  # one of KINDS
    phase: str  # one of PHASES
    layer: str  # the model path of the op, e.g. 'encoder/blocks/mscffn/fc1'; '' for optimiser ops
    bytes: int = 0  # its operands and results in device memory, once (what a memory-bound kernel moves)
    shape: str = ""  # its result, as the HLO writes it (without layouts)


@dataclasses.dataclass
class StepProfile:
    """Milliseconds per step, per traced HLO op, and the step's own wall time (of the traced steps);
    how many ops (GPU: kernels) ran per step and for how much of the step any of them ran."""

    op_ms: dict[str, float]
    ops: dict[str, HloOp]
    step_ms: float
    ops_per_step: float = 0.0
    busy_ms: float = 0.0

    def total_ms(self) -> float:
        return sum(self.op_ms.values())

    def gigabytes(self, kind: str) -> float:
        """GB per step that `kind`'s traced ops read and write (each op's operands and results once)."""
        return sum(self.ops[name].bytes for name in self.op_ms
                   if name in self.ops and self.ops[name].kind == kind) / 1e9

    def by(self, field: str) -> list[tuple[str, float]]:
        """(group, ms per step) by 'kind', 'phase' or 'layer', largest first."""
        totals: collections.Counter[str] = collections.Counter()
        for name, ms in self.op_ms.items():
            op = self.ops.get(name, HloOp("other", PHASES[2], ""))
            totals[getattr(op, field) or PHASES[2]] += ms  # an op of no layer: named as its phase is
        return totals.most_common()


def _split_computations(hlo_text: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines."""
    computations: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match and "->" in line:
                current = computations.setdefault(match.group(1), [])
        elif line.strip() == "}":
            current = None
        else:
            current.append(line)
    return computations


def array_bytes(shape: str) -> int:
    """Bytes of the arrays an HLO shape names, e.g. '(bf16[8,4]{1,0}, f32[4]{0})' -> 80."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        total += _ELEMENT_BYTES.get(dtype, 1) * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _result_shape(shape: str, opcode: str) -> str:
    """An instruction's result without layouts; a library call's byte workspace (cuBLAS, cuDNN: the
    u8 / s8 element of its result tuple) is left out, as it is scratch, not data."""
    arrays = [f"{dtype}[{dims}]" for dtype, dims in _ARRAY.findall(shape)
              if not (opcode == "custom-call" and dtype in ("u8", "s8"))]
    return arrays[0] if len(arrays) == 1 else f"({', '.join(arrays)})"


def _op_name(line: str) -> str:
    match = re.search(r'op_name="([^"]*)"', line)
    return match.group(1) if match else ""


def _kind(opcode: str, line: str, body: Sequence[str]) -> str:
    """What kind of work an instruction does: by its opcode, its custom-call target (cuDNN /
    cuBLAS), or the ops inside the computation it calls (a fusion's body)."""
    if opcode in _CONTAINERS:
        return CONTAINER
    if opcode.startswith(_COLLECTIVES):  # gradient / BatchNorm all-reduces, FSDP gathers
        return "communication"
    found = re.search(r'custom_call_target="([^"]*)"', line)
    target = found.group(1).lower() if found else ""
    text = " ".join([opcode, target, *body]).lower()
    if opcode == "convolution" or "convolution(" in text or "conv" in target:
        return "convolution"
    if opcode == "dot" or " dot(" in text or re.search(r"gemm|matmul", text):
        return "matmul"
    if opcode in ("reduce", "reduce-window") or " reduce(" in text or " reduce-window(" in text:
        return "reduction"
    body_ops = {m["opcode"] for m in map(_INSTRUCTION.match, body) if m}
    if opcode in _DATA_MOVEMENT or (body_ops and body_ops <= _DATA_MOVEMENT | {"parameter", "constant"}):
        return "data movement"
    if opcode == "fusion" or opcode in _ELEMENTWISE_HINT:
        return "elementwise"
    return "other"


def layer_of(op_name: str) -> str:
    """The model path in an op's `op_name` with transforms, method names, block numbers and the
    primitive dropped: 'jit(train_step)/transpose(jvp(GMAE))/GMAE.encode/encoder.encode/blocks_0/
    mscffn/fc1/dot_general' -> 'encoder/blocks/mscffn/fc1'; a fusion named 'blocks_0/msdc/(dconv1/bn/
    reduce_sum:dconv2/bn/reduce_sum)' goes to 'blocks/msdc'."""
    # A fusion of several ops names them 'common/path/(a/x:b/y)': it belongs to the common path,
    # or to several layers where there is none (e.g. one all-reduce of many layers' gradients).
    merged = ":" in op_name
    op_name = re.sub(r"/\([^()]*\)$", "/fused", op_name)
    if ":" in op_name:
        return "(several layers)"
    parts = []
    for part in op_name.split("/")[:-1]:  # the last part is the primitive
        if "(" in part or part[:1].isupper():
            continue  # jit(...), jvp(...), transpose(...), the top-level model's own methods
        part = part.split(".")[0]  # 'encoder.encode' -> 'encoder'; an einsum's '...qhd,...' -> ''
        if part and part not in _CONTROL_FLOW:
            parts.append(re.sub(r"_\d+$", "", part))
    layer = "/".join(dict.fromkeys(parts))  # 'encoder/encoder/...' from nested method calls, once
    return layer or ("(several layers)" if merged else "")


def parse_hlo(hlo_text: str) -> dict[str, HloOp]:
    """Every instruction of the optimised HLO (all computations, so ops inside loops are found too)
    with its kind, phase, layer, result and bytes. An instruction without metadata (XLA:CPU's
    kernel-gradient convolutions, for one) takes the op_name inside its fused body, else that of its
    first user."""
    computations = _split_computations(hlo_text)
    parsed = []  # (name, opcode, line, body, op_name, operand names, result)
    user_op_name: dict[str, str] = {}
    result_bytes: dict[str, int] = {}
    for lines in computations.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, opcode = match["name"], match["opcode"]
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = computations.get(called.group(1), []) if called else []
            op_name = _op_name(line) or next((n for n in map(_op_name, body) if n), "")
            operands = re.findall(r"%([\w.\-]+)", match["operands"].split("), ")[0])
            result = _result_shape(match["shape"], opcode)
            result_bytes[name] = array_bytes(result)
            parsed.append((name, opcode, line, body, op_name, operands, result))
            if op_name:
                for operand in operands:
                    user_op_name.setdefault(operand, op_name)
    ops: dict[str, HloOp] = {}
    for name, opcode, line, body, op_name, operands, result in parsed:
        op_name = op_name or user_op_name.get(name, "")
        layer = layer_of(op_name)
        phase = "backward" if "transpose(" in op_name else "forward" if layer else PHASES[2]
        moved = result_bytes[name] + sum(result_bytes.get(operand, 0) for operand in operands)
        ops[name] = HloOp(_kind(opcode, line, body), phase, layer, moved, result)
    return ops


def _module_name(hlo_text: str) -> str:
    match = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    return match.group(1) if match else ""


def step_events(trace_events: Sequence[Mapping], module: str) -> list[Mapping]:
    """The trace's events of `module`'s HLO ops on one device. Device events are used where the trace
    has any (GPU / TPU kernels), else the host's (XLA:CPU thunks); of several devices, the first (with
    8 devices every op runs 8 times, side by side). On a GPU only its streams' kernels count, should
    the trace hold other lines of the device (derived timelines) that repeat them."""
    events = [e for e in trace_events
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_op")
              and e["args"].get("hlo_module", module) == module]
    process_names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in trace_events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    on_device = [e for e in events if process_names.get(e["pid"], "").startswith("/device:")]
    if on_device:
        first = min({e["pid"] for e in on_device}, key=lambda pid: process_names[pid])
        events = [e for e in on_device if e["pid"] == first]
        streams = {e["tid"] for e in trace_events if e.get("ph") == "M" and e.get("name") == "thread_name"
                   and e.get("pid") == first and str(e.get("args", {}).get("name", "")).startswith("Stream")}
        if "GPU" in process_names[first] and streams:
            events = [e for e in events if e.get("tid") in streams]
    else:  # host threads run every device's thunks: keep the first device's
        ordinals = {str(e["args"].get("device_ordinal", "")) for e in events}
        first_ordinal = min(ordinals, key=lambda o: (len(o), o)) if ordinals else ""
        events = [e for e in events if str(e["args"].get("device_ordinal", "")) == first_ordinal]
    return events


def ms_per_op(events: Sequence[Mapping], num_steps: int) -> dict[str, float]:
    """Milliseconds per step of each HLO op of `step_events`' events (`num_steps` steps of them)."""
    times: collections.Counter[str] = collections.Counter()
    for event in events:
        times[event["args"]["hlo_op"]] += event["dur"] / 1e3 / num_steps
    return dict(times)


def busy_ms(events: Sequence[Mapping]) -> float:
    """Milliseconds in which at least one of `events` ran (their intervals' union): next to the step's
    time, what is left is the device waiting (for launches, the host, or nothing to do)."""
    total, end = 0.0, -math.inf
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


def profile(run_step: Callable[[], object], hlo_text: str, num_steps: int = 3) -> StepProfile:
    """Traces `num_steps` calls of `run_step` (each must wait for its step to finish; call it once
    before so that nothing compiles inside the trace) and joins the trace with `hlo_text`."""
    with tempfile.TemporaryDirectory() as folder:
        jax.profiler.start_trace(folder)
        start = time.perf_counter()
        for _ in range(num_steps):
            run_step()
        step_ms = (time.perf_counter() - start) * 1e3 / num_steps
        jax.profiler.stop_trace()
        paths = glob.glob(f"{folder}/**/*.trace.json.gz", recursive=True)
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no trace.json.gz under {folder}")
        with gzip.open(paths[0]) as file:
            events = json.load(file)["traceEvents"]
    ops = parse_hlo(hlo_text)
    # A loop's or call's own event spans its body's ops, which are traced themselves.
    events = [e for e in step_events(events, _module_name(hlo_text))
              if e["args"]["hlo_op"] not in ops or ops[e["args"]["hlo_op"]].kind != CONTAINER]
    return StepProfile(ms_per_op(events, num_steps), ops, step_ms, len(events) / num_steps,
                       busy_ms(events) / num_steps)


def profile_compiled(compiled: Any, state: Any, *args: Any, num_steps: int = 3) -> tuple[StepProfile, Any]:
    """Runs a compiled `step(state, *args) -> (state, metrics)` twice untraced, then profiles
    `num_steps` steps. Returns the profile and the last state (the step donates its input).

    The executable that was timed is the one traced. XLA:GPU may replay the step's kernels as CUDA
    graphs ("command buffers"), which the trace shows as one op (session 28's H200, JAX 0.11.2:
    the whole step was `command_buffer_1`, although `--xla_enable_command_buffers_during_profiling`
    is off by default); `markdown` then says how to get the per-op profile: a run with
    `--xla_gpu_enable_command_buffer=` (`launch/bench_device.sh`: PROFILE_OPS=1)."""
    holder = {"state": state}

    def run_step() -> None:
        holder["state"], metrics = compiled(holder["state"], *args)
        jax.block_until_ready(metrics)

    run_step()
    run_step()
    result = profile(run_step, compiled.as_text(), num_steps)
    return result, holder["state"]


def profile_train_step(step: Callable, state: Any, *args: Any, num_steps: int = 3) -> StepProfile:
    """The profile of a jitted train step `step(state, *args) -> (state, metrics)`."""
    return profile_compiled(step.lower(state, *args).compile(), state, *args, num_steps=num_steps)[0]


def markdown(result: StepProfile, top_layers: int = 12, top_ops: int = 20, *, untraced_step_ms: float | None = None,
             model_flops: float | None = None, peak_flops: float | None = None) -> str:
    """Four small tables: by kind of work (with the bytes its ops move and at what rate), by phase,
    the layers that take the most time, and the single ops that do (one pathological kernel, e.g. a
    transpose, shows up there). `untraced_step_ms` (the same step timed without the profiler),
    `model_flops` (per step and device) and `peak_flops` add what the trace alone cannot say: how much
    tracing slowed the step, and the rate of the matmuls and convolutions against the device's peak."""
    total = result.total_ms() or 1.0
    untraced = f" ({untraced_step_ms:.1f} ms untraced)" if untraced_step_ms else ""
    lines = [f"traced ops: {result.total_ms():.1f} ms per step of a {result.step_ms:.1f} ms traced step{untraced} "
             "(ops that overlap count in full; ops over the step time = work run side by side)"]
    if result.ops_per_step:
        lines.append(f"{result.ops_per_step:.0f} ops (GPU: kernels) per step; at least one of them running "
                     f"{result.busy_ms:.1f} ms of the {result.step_ms:.1f} ms (the rest: the device waiting on "
                     "launches, the host, or dependencies)")
    unknown = sorted((ms, name) for name, ms in result.op_ms.items() if name not in result.ops)[::-1]
    if unknown:
        lines.append(f"{sum(ms for ms, _ in unknown):.1f} ms in traced ops the HLO does not name (counted as "
                     f"'other'), e.g. {', '.join(name for _, name in unknown[:3])}")
    graphed = sum(ms for ms, name in unknown if name.startswith(COMMAND_BUFFER))
    if graphed:
        lines.append(f"{graphed:.1f} ms ran as CUDA graphs (XLA's command buffers), which a trace does not break "
                     f"down by op: for the per-op profile run with XLA_FLAGS={NO_COMMAND_BUFFERS} "
                     "(launch/bench_device.sh: PROFILE_OPS=1); the step may then run a little slower")
    kinds = dict(result.by("kind"))
    if model_flops:
        ms = kinds.get("matmul", 0.0) + kinds.get("convolution", 0.0)
        rate = model_flops / (ms / 1e3) if ms else 0.0
        of_peak = f", {100 * rate / peak_flops:.0f} % of the {peak_flops / 1e12:.0f} TFLOP/s peak" if peak_flops else ""
        lines.append(f"matmuls and convolutions: the model's {model_flops / 1e12:.3g} TFLOP per step and device in "
                     f"{ms:.1f} ms of their ops, {rate / 1e12:.3g} TFLOP/s{of_peak}")
    lines.append("")
    lines += ["| kind of work | ms per step | share | GB per step | GB/s |", "|---|---:|---:|---:|---:|"]
    for name, ms in kinds.items():
        moved = result.gigabytes(name)
        rate = f"{moved / (ms / 1e3):.0f}" if moved and ms else "-"
        lines.append(f"| {name} | {ms:.2f} | {100 * ms / total:.1f} % | {moved:.2f} | {rate} |")
    lines.append("")
    layers = result.by("layer")[:top_layers]
    for title, rows in (("phase", result.by("phase")), ("layer (block numbers merged)", layers)):
        lines += [f"| {title} | ms per step | share |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.2f} | {100 * ms / total:.1f} % |" for name, ms in rows]
        lines.append("")
    lines += [OPS_HEADER]
    for name, ms in sorted(result.op_ms.items(), key=lambda item: -item[1])[:top_ops]:
        op = result.ops.get(name, HloOp("other", PHASES[2], ""))
        lines.append(f"| {name} | {op.kind} | {op.phase} | {op.layer or '-'} | {op.shape or '-'} | {ms:.2f} | "
                     f"{100 * ms / total:.1f} % |")
    return "\n".join(lines)


OPS_HEADER = ("| HLO op | kind | phase | layer | result | ms per step | share |\n"
              "|---|---|---|---|---|---:|---:|")
