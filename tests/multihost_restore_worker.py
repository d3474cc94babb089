"""One of two processes of `test_multiprocess.test_processes_agree_on_the_restored_step`.

Both save steps 1 and 2 of a small replicated array and one split over the processes, then look for
the newest step that restores through a read-only manager while process 1 cannot read step 2 (a flaky
link to the bucket; the failure comes before orbax's read, so process 0 is still reading when process
1 gives up).
Prints, as JSON, the step it restored, its value and the reasons given for the steps passed over.
"""

import json
import sys

import jax
import numpy as np

from gmae_jax import distributed
from gmae_jax.train import checkpoint


def main(address: str, rank: int, directory: str) -> None:
    distributed.initialize(coordinator_address=address, num_processes=2, process_id=rank, num_cpu_devices=2)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))  # half on each process
    manager = checkpoint.make_manager(directory, max_to_keep=3)
    for step in (1, 2):
        checkpoint.save(manager, step, {"w": jax.device_put(np.full(4, float(step)), replicated),
                                        "v": jax.device_put(np.arange(4.0) * step, split)}, None)
    manager.wait_until_finished()
    manager.close()
    # "v"'s fingerprint at restore sums over both processes: process 0 must not wait in that sum for a
    # process 1 that gave up on the step.
    template = {"w": jax.device_put(np.zeros(4), replicated), "v": jax.device_put(np.zeros(4), split)}
    reader = checkpoint.make_manager(directory, max_to_keep=1, read_only=True)

    def restore_one(step: int) -> dict:
        if rank == 1 and step == 2:
            raise OSError("simulated read failure on process 1")
        return checkpoint.restore(reader, template, None, step)

    restored, step, failures = checkpoint.newest_that_restores(directory, reader.all_steps(), restore_one, "")
    reader.close()
    value = float(np.asarray(restored["w"].addressable_data(0))[0])
    print(json.dumps({"step": step, "value": value, "failures": failures}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
