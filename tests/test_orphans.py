"""A trainer killed with SIGKILL leaves no grain worker (nor anything else it started) behind."""

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
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from gmae_jax.data import class_folders, pipeline

    if __name__ == "__main__":
        train = class_folders.scan_split(sys.argv[1], "train")
        data = pipeline.make_train_dataset(train, image_size=32, global_batch_size=4, seed=0,
                                           aug=pipeline.AugmentConfig(), num_workers=2)
        iterator = iter(data)
        next(iterator)
        print("ready", flush=True)
        while True:
            next(iterator)
""")


def test_sigkill_of_the_trainer_ends_its_grain_workers(tmp_path):
    synthetic.write_demo_dataset(str(tmp_path / "data"), image_size=32, train_per_class=4, val_per_class=1,
                                 classes=("fist", "palm"))
    script = tmp_path / "loader.py"
    script.write_text(LOADER)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data")], cwd=REPO,
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
