"""metrics.jsonl and progress lines."""

import json
import time

import pytest

from gmae_jax import user_errors
from gmae_jax.train import divergence, progress


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_resumed_writer_drops_records_after_the_checkpoint(tmp_path):
    first = progress.MetricsWriter(str(tmp_path))
    for step in (1, 2, 3):
        first.write({"step": step, "loss": float(step)})
    resumed = progress.MetricsWriter(str(tmp_path), start_step=1)
    resumed.write({"step": 2, "loss": 20.0})
    assert read(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 20.0}]


def test_progress_line_reports_throughput_and_eta():
    tracker = progress.Progress(total_steps=100, start_step=0, global_batch_size=32)
    rates = tracker.update(10)
    line = tracker.log_line("pretrain", 10, {"loss": 0.5, "lr": 1e-3, **rates})
    assert line.startswith("[pretrain] step 10/100 | loss 0.5 | lr 0.001 |")
    assert "img/s" in line and "ETA" in line
    assert rates["img_per_sec"] > 0
    assert rates["eta_sec"] == pytest.approx(90 * 32 / rates["img_per_sec"], rel=1e-6)


def test_the_first_steps_compile_is_left_out_of_throughput_and_eta():
    tracker = progress.Progress(total_steps=100, start_step=0, global_batch_size=32)
    time.sleep(0.4)  # the first step: compiling
    first = tracker.first_step_done(1)
    assert first >= 0.4
    at_first = tracker.update(1)  # a log point at the first step: no rate or ETA from a compile
    assert at_first == {}
    assert tracker.log_line("pretrain", 1, {"loss": 0.5, **at_first}) == "[pretrain] step 1/100 | loss 0.5"
    time.sleep(0.1)  # steps 2 and 3
    rates = tracker.update(3)
    assert 32 / 0.05 / 2 < rates["img_per_sec"] <= 32 / 0.05  # ~0.05 s a step, not (0.4 + 0.1) / 3
    assert rates["eta_sec"] == pytest.approx(97 * 32 / rates["img_per_sec"], rel=1e-6)


def test_evaluations_and_saves_between_log_points_are_left_out_of_throughput():
    tracker = progress.Progress(total_steps=100, start_step=0, global_batch_size=32)
    tracker.first_step_done(1)
    time.sleep(0.1)  # steps 2 to 5
    with tracker.not_training():
        time.sleep(0.5)  # an evaluation and a checkpoint save
    rates = tracker.update(5)
    assert rates["img_per_sec"] > 32 * 4 / 0.3  # ~0.1 s of steps, not 0.6 s
    assert rates["input_wait"] == 0.0
    time.sleep(0.1)
    assert tracker.update(9)["img_per_sec"] < 32 * 4 / 0.08  # the next interval starts afresh


def test_progress_reports_the_share_of_time_spent_waiting_for_input():
    tracker = progress.Progress(total_steps=100, start_step=0, global_batch_size=32)
    with tracker.waiting_for_input():
        time.sleep(0.2)  # a slow loader
    time.sleep(0.2)  # the step
    rates = tracker.update(1)
    assert rates["input_wait"] == pytest.approx(0.5, abs=0.15)
    assert "| input wait " in tracker.log_line("pretrain", 1, {"loss": 0.5, **rates})
    time.sleep(0.1)
    assert tracker.update(2)["input_wait"] < 0.1  # counted per interval: nothing waited since


def test_an_input_bound_run_says_once_what_to_change(caplog, monkeypatch):
    monkeypatch.setattr(progress.host_resources, "usable_cores", lambda: 16)
    tracker = progress.Progress(total_steps=100, start_step=0, global_batch_size=32, num_workers=4)
    for step in (1, 2, 3):
        with tracker.waiting_for_input():
            time.sleep(0.1)
        tracker.update(step)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings  # not for the first interval (workers starting), then once
    assert warnings[0].startswith("the input pipeline sets the pace: the loop waited for its next batch ")
    assert "Raise --config.data.num_workers (now 4; this host has 16 cores)" in warnings[0]
    assert "or train from prepared shards (configs/prepare.py)" in warnings[0]
    # A worker on every core already: more workers would not help.
    assert "with a worker on every core (2 workers, 2 cores)" in progress.input_bound_advice(0.9, 2, 2)
    assert progress.input_bound_advice(0.2, 4, 16) is None


def test_a_run_reading_prepared_shards_is_not_told_to_prepare_them():
    free_cores = progress.input_bound_advice(0.9, 4, 16, from_shards=True)
    assert "Raise --config.data.num_workers (now 4; this host has 16 cores)." in free_cores
    every_core = progress.input_bound_advice(0.9, 2, 2, from_shards=True)
    assert "reading prepared shards already" in every_core
    for advice in (free_cores, every_core):
        assert "configs/prepare.py" not in advice
    assert "configs/prepare.py" in progress.input_bound_advice(0.9, 2, 2, from_shards=False)


def test_non_finite_metric_names_the_step_and_last_checkpoint():
    with pytest.raises(FloatingPointError, match="grad_norm became non-finite at step 9; no checkpoint") as error:
        divergence.check_finite({"grad_norm": float("inf")}, 9, "/w/checkpoints", None)
    # The entry point prints it as one line, as a mistake in the settings; float32 is no remedy in float32.
    assert user_errors.one_line(error.value) == (
        "grad_norm became non-finite at step 9; no checkpoint was saved yet. To train on: lower --config.optim.lr "
        "or keep --config.optim.grad_clip > 0.")
    with pytest.raises(FloatingPointError, match=r"or use --config.model.dtype=float32 \(this run computes in "
                                                 r"bfloat16\)\.$"):
        divergence.check_finite({"loss": float("nan")}, 9, "/w/checkpoints", 5, "bfloat16")


def test_a_cut_off_last_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
    first = progress.MetricsWriter(str(tmp_path))
    for step in (1, 2):
        first.write({"step": step, "loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 3, "lo')  # killed in the middle of a write
    resumed = progress.MetricsWriter(str(tmp_path), start_step=2)
    resumed.write({"step": 3, "loss": 3.0})
    assert read(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 3.0}]
    assert f"{path} line 3 is not a whole metrics record" in caplog.text


def test_an_eta_past_what_a_timedelta_holds_reads_in_years():
    assert progress.format_duration(3661) == "1:01:01"
    assert progress.format_duration(-5) == "0:00:00"
    assert progress.format_duration(1e22) == "3.17e+14 years"  # 2**31 steps at ~10**13 s each, say
    assert progress.format_duration(float("inf")) == "inf years"
