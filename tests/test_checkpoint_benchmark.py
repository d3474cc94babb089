"""The checkpoint save benchmark runs (its numbers go to BENCHMARKS.md, never asserted as speed)."""

import re

import jax
import orbax.checkpoint as ocp

from gmae_jax.bench import checkpoint_benchmark


def test_whole_array_saves_compile_nothing_and_the_process_keeps_its_setting():
    assert jax.device_count() == 8  # replicated arrays have 8 copies to slice
    results = checkpoint_benchmark.save_seconds("micro", saves=2, depth=1)
    assert results["whole arrays"]["compiles"] == 0
    assert results["replica-parallel"]["compiles"] > 0  # a slice program per array shape and device
    assert all(r["first_s"] > 0 and r["later_s"] > 0 for r in results.values())
    table = checkpoint_benchmark.markdown_table("micro", results)
    assert "| whole arrays | " in table and "| replica-parallel | " in table
    first, later = map(float, re.search(r"first save \*\*([\d.]+)x\*\*, later saves \*\*([\d.]+)x\*\*", table).groups())
    ratio = results["replica-parallel"]["first_s"] / results["whole arrays"]["first_s"]
    assert abs(first - ratio) < 0.006 and later > 0
    # A single process goes back to writing whole arrays after the benchmark.
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
