"""Input workers leave nothing behind: not after a SIGKILL of the trainer (no grain worker lives
on), not after a run that ends right after its last batch (no shared memory left to warn about)."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil

from gmae_jax.data import synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LOADER = textwrap.dedent("""
    import sys
    import psutil
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from gmae_jax import job_failures
    from gmae_jax.data import class_folders, pipeline

    if __name__ == "__main__":
        train = class_folders.scan_split(sys.argv[1], "train")
        data = pipeline.make_train_dataset(train, image_size=32, global_batch_size=4, seed=0,
                                           aug=pipeline.AugmentConfig(), num_workers=2)
        iterator = iter(data)
        for _ in range(4):  # both workers have handed on batches
            next(iterator)
        if sys.argv[2] == "leave":  # as a process of a failed multi-process job leaves it
            print(*[child.pid for child in psutil.Process().children(recursive=True)], flush=True)
            job_failures.leave("error: this process failed\\n")
        print("ready", flush=True)
        while True:
            next(iterator)
""")


EVALUATOR = textwrap.dedent("""
    import sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from gmae_jax.data import class_folders, pipeline

    def evaluate(examples):
        dataset = pipeline.make_eval_dataset(examples, image_size=32, global_batch_size=4, num_workers=2)
        return sum(int(batch["valid"].sum()) for batch in dataset)

    if __name__ == "__main__":
        print("read", evaluate(class_folders.scan_split(sys.argv[1], "train")), flush=True)
""")


def _demo_data(tmp_path):
    synthetic.write_demo_dataset(str(tmp_path / "data"), image_size=32, train_per_class=4, val_per_class=1,
                                 classes=("fist", "palm"))
    return str(tmp_path / "data")


def test_a_run_ending_after_its_last_batch_leaves_no_shared_memory(tmp_path):
    """grain frees each batch's shared memory on a thread; exiting at once used to leave the last
    batches to Python's resource tracker, which warned about leaked shared_memory objects."""
    script = tmp_path / "evaluate.py"
    script.write_text(EVALUATOR)
    done = subprocess.run([sys.executable, str(script), _demo_data(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "read 8"
    assert "leaked shared_memory" not in done.stderr, done.stderr[-3000:]
    assert "Exception ignored" not in done.stderr, done.stderr[-3000:]


def test_sigkill_of_the_trainer_ends_its_grain_workers(tmp_path):
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    proc = subprocess.Popen([sys.executable, str(script), _demo_data(tmp_path), "run"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2  # the two workers (and multiprocessing's resource tracker)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, [p.cmdline() for p in alive]
    finally:
        proc.kill()


def test_a_process_leaving_a_failed_job_ends_its_grain_workers(tmp_path):
    """`job_failures.leave` skips Python's exit hooks (which would wait for the other processes), so it
    ends the input workers itself. (The trainer closes its iterators as an error passes; this one is
    left open, so the workers are still running when the process leaves.)"""
    script = tmp_path / "loader.py"
    script.write_text(LOADER)

    done = subprocess.run([sys.executable, str(script), _demo_data(tmp_path), "leave"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)

    assert done.returncode == 1, done.stderr[-3000:]
    assert "error: this process failed\n" in done.stderr
    children = [psutil.Process(int(pid)) for pid in done.stdout.split() if psutil.pid_exists(int(pid))]
    assert len(done.stdout.split()) >= 2  # the two workers (and multiprocessing's resource tracker)
    gone, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
