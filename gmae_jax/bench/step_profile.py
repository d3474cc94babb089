"""Where a compiled train step spends its time: a `jax.profiler` trace of a few steps, each traced op
joined with the optimised HLO it ran (`compiled.as_text()`) and summed by kind of work (matmul,
convolution, reduction, elementwise, ...), by phase (forward, backward, optimiser) and by layer.

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
import re
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

KINDS = ("matmul", "convolution", "reduction", "elementwise", "data movement", "communication", "other")
PHASES = ("forward", "backward", "optimiser and other")

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*.*?\s([a-z][\w\-]*)\((.*)$")
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
_ELEMENTWISE_HINT = {"add", "multiply", "subtract", "divide", "exponential", "erf", "tanh", "maximum",
                     "select", "compare", "convert", "rsqrt", "sqrt", "logistic", "negate", "power"}


@dataclasses.dataclass(frozen=True)
class HloOp:
    """One top-level instruction of the optimised program, as a profile groups it."""

    kind: str  # one of KINDS
    phase: str  # one of PHASES
    layer: str  # the model path of the op, e.g. 'encoder/blocks/mscffn/fc1'; '' for optimiser ops


@dataclasses.dataclass
class StepProfile:
    """Milliseconds per step, per traced HLO op, and the step's own wall time."""

    op_ms: dict[str, float]
    ops: dict[str, HloOp]
    step_ms: float

    def total_ms(self) -> float:
        return sum(self.op_ms.values())

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
    body_ops = {m.group(2) for m in map(_INSTRUCTION.match, body) if m}
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
    with its kind, phase and layer. An instruction without metadata (XLA:CPU's kernel-gradient
    convolutions, for one) takes the op_name inside its fused body, else that of its first user."""
    computations = _split_computations(hlo_text)
    parsed = []  # (name, opcode, line, body, op_name)
    user_op_name: dict[str, str] = {}
    for lines in computations.values():
        for line in lines:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            name, opcode, operands = match.groups()
            called = re.search(r"calls=%?([\w.\-]+)", line)
            body = computations.get(called.group(1), []) if called else []
            op_name = _op_name(line) or next((n for n in map(_op_name, body) if n), "")
            parsed.append((name, opcode, line, body, op_name))
            if op_name:
                for operand in re.findall(r"%([\w.\-]+)", operands.split("), ")[0]):
                    user_op_name.setdefault(operand, op_name)
    ops: dict[str, HloOp] = {}
    for name, opcode, line, body, op_name in parsed:
        op_name = op_name or user_op_name.get(name, "")
        layer = layer_of(op_name)
        phase = "backward" if "transpose(" in op_name else "forward" if layer else PHASES[2]
        ops[name] = HloOp(_kind(opcode, line, body), phase, layer)
    return ops


def _module_name(hlo_text: str) -> str:
    match = re.match(r"\s*HloModule\s+([\w.\-]+)", hlo_text)
    return match.group(1) if match else ""


def op_times_ms(trace_events: Sequence[Mapping], module: str, num_steps: int) -> dict[str, float]:
    """Milliseconds per step of each HLO op of `module` on one device, from a Chrome-format trace.
    Device events are used where the trace has any (GPU / TPU kernels), else the host's (XLA:CPU
    thunks); of several devices, the first (with 8 devices every op runs 8 times, side by side)."""
    events = [e for e in trace_events
              if e.get("ph") == "X" and e.get("args", {}).get("hlo_op")
              and e["args"].get("hlo_module", module) == module]
    process_names = {e["pid"]: str(e.get("args", {}).get("name", "")) for e in trace_events
                     if e.get("ph") == "M" and e.get("name") == "process_name"}
    on_device = [e for e in events if process_names.get(e["pid"], "").startswith("/device:")]
    if on_device:
        first = min({e["pid"] for e in on_device}, key=lambda pid: process_names[pid])
        events = [e for e in on_device if e["pid"] == first]
    else:  # host threads run every device's thunks: keep the first device's
        ordinals = {str(e["args"].get("device_ordinal", "")) for e in events}
        first_ordinal = min(ordinals, key=lambda o: (len(o), o)) if ordinals else ""
        events = [e for e in events if str(e["args"].get("device_ordinal", "")) == first_ordinal]
    times: collections.Counter[str] = collections.Counter()
    for event in events:
        times[event["args"]["hlo_op"]] += event["dur"] / 1e3 / num_steps
    return dict(times)


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
    times = {name: ms for name, ms in op_times_ms(events, _module_name(hlo_text), num_steps).items()
             if name not in ops or ops[name].kind != CONTAINER}
    return StepProfile(times, ops, step_ms)


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


def markdown(result: StepProfile, top_layers: int = 12, top_ops: int = 8) -> str:
    """Four small tables: by kind of work, by phase, the layers that take the most time, and the
    single ops that do (one pathological kernel, e.g. a transpose, shows up there)."""
    total = result.total_ms() or 1.0
    lines = [f"traced ops: {result.total_ms():.1f} ms per step of a {result.step_ms:.1f} ms step "
             "(ops that overlap count in full; ops over the step time = work run side by side)"]
    unknown = sorted((ms, name) for name, ms in result.op_ms.items() if name not in result.ops)[::-1]
    if unknown:
        lines.append(f"{sum(ms for ms, _ in unknown):.1f} ms in traced ops the HLO does not name (counted as "
                     f"'other'), e.g. {', '.join(name for _, name in unknown[:3])}")
    graphed = sum(ms for ms, name in unknown if name.startswith(COMMAND_BUFFER))
    if graphed:
        lines.append(f"{graphed:.1f} ms ran as CUDA graphs (XLA's command buffers), which a trace does not break "
                     f"down by op: for the per-op profile run with XLA_FLAGS={NO_COMMAND_BUFFERS} "
                     "(launch/bench_device.sh: PROFILE_OPS=1); the step may then run a little slower")
    lines.append("")
    for title, rows in (("kind of work", result.by("kind")), ("phase", result.by("phase")),
                        ("layer (block numbers merged)", result.by("layer")[:top_layers])):
        lines += [f"| {title} | ms per step | share |", "|---|---:|---:|"]
        lines += [f"| {name} | {ms:.2f} | {100 * ms / total:.1f} % |" for name, ms in rows]
        lines.append("")
    lines += ["| HLO op | kind | phase | layer | ms per step | share |", "|---|---|---|---|---:|---:|"]
    for name, ms in sorted(result.op_ms.items(), key=lambda item: -item[1])[:top_ops]:
        op = result.ops.get(name, HloOp("other", PHASES[2], ""))
        lines.append(f"| {name} | {op.kind} | {op.phase} | {op.layer or '-'} | {ms:.2f} | {100 * ms / total:.1f} % |")
    return "\n".join(lines)
