"""Progress lines (step, loss, lr, img/s, ETA) and the `metrics.jsonl` file of a workdir."""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import time
from collections.abc import Iterator
from typing import Any

import jax
from absl import logging
from etils import epath

from gmae_jax import host_resources, run_files
from gmae_jax.train.run_folder import METRICS_FILE


class MetricsWriter:
    """One JSON object per line in `metrics.jsonl`; only process 0 writes, so multi-host runs keep one
    file. The file is rewritten whole (cloud buckets cannot append), and a resumed run drops the
    records after its checkpoint, which it is about to produce again."""

    def __init__(self, workdir: str, start_step: int = 0):
        self.path = epath.Path(workdir) / METRICS_FILE
        self.enabled = jax.process_index() == 0
        self.lines: list[str] = []
        if self.enabled and self.path.exists():
            self.lines = [line for line, record in _readable_records(self.path)
                          if record["step"] <= start_step]

    def has(self, step: int, split: str) -> bool:
        """Whether the file holds a record of `split` at `step` (process 0 only knows)."""
        return any((record := _metrics_record(line)) and record["step"] == step and record.get("split") == split
                   for line in self.lines)

    def write(self, record: dict[str, Any]) -> None:
        """Non-finite values (a diverged run's last line) as null: Python writes NaN, which is not JSON
        and which jq, JavaScript and strict readers refuse."""
        if not self.enabled:
            return
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self.lines.append(json.dumps(record, sort_keys=True, allow_nan=False))
        run_files.write_text(self.path, "\n".join(self.lines) + "\n")


def _metrics_record(line: str) -> dict[str, Any] | None:
    """The record on one line of metrics.jsonl, or None where the line is not a whole record."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def _readable_records(path: epath.Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for every whole record; a line cut off by a kill mid-write (or any other
    unreadable line) is dropped with a warning that names the file, never a JSONDecodeError."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = _metrics_record(line)
        if record is None:
            logging.warning("%s line %d is not a whole metrics record (cut off by a kill?); dropped it",
                            path, number)
        else:
            records.append((line, record))
    return records


def format_duration(seconds: float) -> str:
    """'1 day, 2:03:04'; an ETA past what a timedelta holds (a run of 2**31 slow steps) reads in years."""
    seconds = max(seconds, 0.0)
    if not seconds < datetime.timedelta.max.days * 86400:
        return f"{seconds / (365.25 * 86400):.3g} years"
    return str(datetime.timedelta(seconds=int(seconds)))


# Above this share of a log interval spent waiting for batches, the run says what to change (once).
INPUT_BOUND_SHARE = 0.3


# BENCHMARKS.md, "Colour jitter on the device": 224 px views per core from prepared shards vs HaGRID's files.
_SHARDS_GAIN = ("they hold the images decoded and resized once (at 224 px a worker makes ~9x the views per second "
                "from them that it makes from HaGRID's full-HD JPEGs)")


def input_bound_advice(input_wait: float, num_workers: int, cpu_count: int | None,
                       from_shards: bool = False) -> str | None:
    """What to change when the loop waited for its input more than INPUT_BOUND_SHARE of an interval;
    prepared shards are suggested only to a run that does not read them already."""
    if input_wait <= INPUT_BOUND_SHARE:
        return None
    said = (f"the input pipeline sets the pace: the loop waited for its next batch {100 * input_wait:.0f} % "
            f"of the last interval")
    shards = "" if from_shards else f"train from prepared shards (configs/prepare.py): {_SHARDS_GAIN}"
    if cpu_count and num_workers < cpu_count - 1:
        return (f"{said}. Raise --config.data.num_workers (now {num_workers}; this host has {cpu_count} cores)"
                + (f", or {shards}." if shards else "."))
    on_every_core = f"{said}, with a worker on every core ({num_workers} workers, {cpu_count or '?'} cores)"
    if shards:
        return f"{on_every_core}. Prepare the data: {shards}; or train on a host with more cores per accelerator."
    return (f"{on_every_core}, reading prepared shards already: train on a host with more cores per "
            "accelerator, or spend more of each step on the accelerator (a larger model or batch).")


class Progress:
    """Measures throughput between log points. The run's first step (compilation, the workers' start)
    is timed apart (`first_step_done`) so that img/s and ETA describe the steady state from the first
    progress line on.

    Also the share of the interval the loop spent waiting for the input pipeline (`input_wait`):
    steps are dispatched asynchronously, so a loop that keeps the device busy waits on the device's
    results, not on the next batch; a high share means more loader workers (or prepared shards) would
    make training faster, and from the second interval on (the first includes the workers' start)
    the run says so once (`input_bound_advice`)."""

    def __init__(self, total_steps: int, start_step: int, global_batch_size: int, num_workers: int = 0,
                 from_shards: bool = False):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.num_workers = num_workers
        self.from_shards = from_shards  # the input: images resized once (prepared shards or a TFDS build)
        self.last_step = start_step
        self.last_time = time.perf_counter()
        self.input_seconds = 0.0
        self.other_seconds = 0.0  # evaluations and checkpoint saves: not training throughput
        self.intervals = 0
        self.advised = False
        self.first_step_seconds: float | None = None

    @contextlib.contextmanager
    def waiting_for_input(self) -> Iterator[None]:
        """Wrap the loop's fetch of its next batch."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.input_seconds += time.perf_counter() - start

    @contextlib.contextmanager
    def not_training(self) -> Iterator[None]:
        """Wrap work between steps (an evaluation, a checkpoint save): its time is left out of the
        interval's img/s and ETA, which otherwise collapse on the line after each."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.other_seconds += time.perf_counter() - start

    def first_step_done(self, step: int) -> float:
        """Call when the run's first step has finished (the caller waited for it): returns its
        seconds, compilation included, and starts the first interval after it."""
        now = time.perf_counter()
        self.first_step_seconds = now - self.last_time
        self.last_step, self.last_time, self.input_seconds, self.other_seconds = step, now, 0.0, 0.0
        return self.first_step_seconds

    def update(self, step: int) -> dict[str, float]:
        """img/s, ETA and input wait of the interval since the last call; nothing at a log point at
        the run's first step, whose time is mostly compiling (it is logged apart)."""
        now = time.perf_counter()
        if step == self.last_step and self.first_step_seconds is not None:
            return {}
        steps = max(step - self.last_step, 1)
        interval = max(now - self.last_time - self.other_seconds, 1e-9)
        input_wait = min(self.input_seconds / interval, 1.0)
        seconds_per_step = interval / steps
        self.last_step, self.last_time, self.input_seconds, self.other_seconds = step, now, 0.0, 0.0
        self.intervals += 1
        if self.intervals > 1 and not self.advised:
            advice = input_bound_advice(input_wait, self.num_workers, host_resources.usable_cores(),
                                        self.from_shards)
            if advice:
                logging.warning(advice)
                self.advised = True
        return {
            "img_per_sec": self.global_batch_size / max(seconds_per_step, 1e-9),
            "eta_sec": seconds_per_step * (self.total_steps - step),
            "input_wait": input_wait,
        }

    def log_line(self, stage: str, step: int, metrics: dict[str, float]) -> str:
        parts = [f"[{stage}] step {step}/{self.total_steps}"]
        for key in ("loss", "accuracy", "lr", "grad_norm"):
            if key in metrics:
                parts.append(f"{key} {metrics[key]:.4g}")
        if "img_per_sec" in metrics:
            parts.append(f"{metrics['img_per_sec']:.1f} img/s")
        if "input_wait" in metrics:
            parts.append(f"input wait {100 * metrics['input_wait']:.0f} %")
        if "eta_sec" in metrics:
            parts.append(f"ETA {format_duration(metrics['eta_sec'])}")
        line = " | ".join(parts)
        logging.info(line)
        return line
