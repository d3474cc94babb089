"""Specification of the grain train and eval pipelines.

Every example gets its own label, so a batch's labels say exactly which files it holds.
"""

import itertools
import json
import re
import shutil

from absl import flags
import ml_collections
import numpy as np
from PIL import Image
import pytest

from gmae_jax import schema
from gmae_jax.data import input_workers, pipeline, transforms
from gmae_jax.data.class_folders import Example
from gmae_jax.data.transforms import ImageDecodeError
from gmae_jax.train import start_warnings

# grain's worker processes read absl flags; outside absl.app.run nobody parses them.
flags.FLAGS.mark_as_parsed()

NUM_EXAMPLES = 12
IMAGE_SIZE = 8


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    result = []
    for i in range(NUM_EXAMPLES):
        path = root / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).save(path)
        result.append(Example(str(path), label=i))
    return result


def _train(examples, num_workers=0, seed=0, global_batch_size=4, **kwargs):
    return pipeline.make_train_dataset(
        examples,
        image_size=IMAGE_SIZE,
        global_batch_size=global_batch_size,
        seed=seed,
        aug=kwargs.pop("aug", schema.AugmentConfig()),
        num_workers=num_workers,
        **kwargs,
    )


def _eval(examples, global_batch_size=4, **kwargs):
    return pipeline.make_eval_dataset(
        examples,
        image_size=IMAGE_SIZE,
        global_batch_size=global_batch_size,
        num_workers=0,
        **kwargs,
    )


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])


def test_train_batch_shapes_and_dtypes(examples):
    batch = next(iter(_train(examples)))

    assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["image"].dtype == np.uint8  # standardised on the device, in the step
    assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
    # Drawn by the workers, applied in the step: (brightness, contrast, saturation, hue shift).
    assert batch["color_jitter"].shape == (4, 8) and batch["color_jitter"].dtype == np.float32
    assert len(np.unique(batch["color_jitter"][:, 0])) == 4


def test_train_batches_are_determined_by_the_seed(examples):
    first = _take(iter(_train(examples, seed=5)), 2)

    _assert_same_batches(first, _take(iter(_train(examples, seed=5)), 2))
    assert not np.array_equal(first[0]["image"], next(iter(_train(examples, seed=6)))["image"])


def test_train_sees_every_example_once_per_epoch_and_reshuffles(examples):
    batches = _take(iter(_train(examples)), 6)  # Two epochs of 12.

    epochs = [np.concatenate([b["label"] for b in batches[i : i + 3]]) for i in (0, 3)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_EXAMPLES))
    assert not np.array_equal(epochs[0], epochs[1])


def test_train_accepts_a_configdict_for_augmentation(examples):
    aug = ml_collections.ConfigDict(
        dict(crop_scale_min=0.5, hflip=False, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    )

    batch = next(iter(_train(examples, aug=aug)))

    assert batch["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3)
    np.testing.assert_array_equal(batch["color_jitter"], np.tile(transforms.IDENTITY_JITTER, (4, 1)))


def test_train_reads_only_a_few_batches_ahead(examples, monkeypatch, tmp_path):
    # Count only this test's copies: iterators of earlier tests may still be reading ahead.
    own = [Example(shutil.copy(e.path, tmp_path), e.label) for e in examples]
    decoded = []
    decode = pipeline.transforms.decode_rgb

    def counting_decode(path, **kwargs):
        if path.startswith(str(tmp_path)):
            decoded.append(path)
        return decode(path, **kwargs)

    monkeypatch.setattr(pipeline.transforms, "decode_rgb", counting_decode)

    next(iter(_train(own)))

    assert len(decoded) <= 3 * 4  # The batch taken plus at most two read ahead.


def test_train_batches_identical_for_0_and_2_workers(examples):
    without_workers = _take(iter(_train(examples, num_workers=0)), 4)
    with_workers = _take(iter(_train(examples, num_workers=2)), 4)

    _assert_same_batches(without_workers, with_workers)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_resumes_exactly_from_state_mid_epoch(examples, num_workers):
    iterator = iter(_train(examples, num_workers=num_workers))
    _take(iterator, 2)  # Stop inside the first epoch (3 batches).
    state = iterator.get_state()
    expected = _take(iterator, 3)  # Runs across the epoch boundary.

    resumed = iter(_train(examples, num_workers=num_workers))
    resumed.set_state(state)

    _assert_same_batches(_take(resumed, 3), expected)


def test_a_state_resumes_with_another_worker_count(examples):
    """A resumed run may have another config.data.num_workers, or 'auto' on a host with other cores."""
    iterator = iter(_train(examples, num_workers=2))
    _take(iterator, 2)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    expected = _take(iterator, 3)

    for num_workers in (0, 1):
        resumed = iter(_train(examples, num_workers=num_workers))
        resumed.set_state(state)
        _assert_same_batches(_take(resumed, 3), expected)


def test_a_closed_iterator_frees_its_workers_and_continues_where_it_stopped(examples):
    """The trainer closes it when training ends: the workers stop and the batches they had ready in
    shared memory are freed then, not left to the resource tracker at exit."""
    iterator = iter(_train(examples, num_workers=1))
    first = _take(iterator, 2)
    iterator.close()

    _assert_same_batches(first + _take(iterator, 2), _take(iter(_train(examples)), 4))


def test_states_of_grains_own_iterators_from_older_checkpoints_still_resume(examples):
    batches = _train(examples).batches
    expected = _take(iter(_train(examples)), 5)[4:]
    for num_workers in (0, 2):  # grain's state: one position, or one per worker
        old_iterator = iter(input_workers.to_iter_dataset(batches, num_workers))
        _take(old_iterator, 4)
        resumed = iter(_train(examples))
        resumed.set_state(json.dumps(old_iterator.get_state()).encode())  # bytes, as grain's handler passes them
        _assert_same_batches(_take(resumed, 1), expected)
    with pytest.raises(ValueError, match="not a state of the train batches' iterator"):
        pipeline.batches_taken({"position": 4})


def test_processes_get_disjoint_shares_that_cover_an_epoch(examples):
    shares = []
    for process_index in range(2):
        ds = _train(examples, global_batch_size=4, process_index=process_index, process_count=2)
        batches = _take(iter(ds), 3)  # 3 batches of 2 = half an epoch.
        assert all(b["label"].shape == (2,) for b in batches)
        shares.append({int(l) for b in batches for l in b["label"]})

    assert shares[0].isdisjoint(shares[1])
    assert shares[0] | shares[1] == set(range(NUM_EXAMPLES))


def test_global_batch_not_divisible_by_processes_raises(examples):
    with pytest.raises(ValueError, match="divisible by process_count=2"):
        _train(examples, global_batch_size=5, process_count=2)


def test_train_decode_error_names_the_file(examples, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not an image")

    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        next(iter(_train([Example(str(bad), 0)] * 4)))


def test_a_class_whose_every_image_is_unreadable_stops_training(examples, tmp_path):
    """Each was replaced by an image of another class, and the run ended as if nothing were wrong (exit
    0), its classifier never having seen that class."""
    (tmp_path / "one").mkdir()
    unreadable = []
    for i in range(3):
        (tmp_path / "one" / f"{i}.jpg").write_bytes(b"not an image")  # e.g. HEIC files named .jpg
        unreadable.append(Example(str(tmp_path / "one" / f"{i}.jpg"), 1))
    split = [Example(e.path, 0) for e in examples[:6]] + unreadable  # class folders list class by class
    with pytest.raises(pipeline.BadImageBudgetError, match=r"^every training image of class 'one' \(3\) is unreadable, "
                       r"so training would never see that class; last: .*\. Remove or re-save the files the "
                       r"warnings name\n"):
        list(itertools.islice(iter(_train(split, global_batch_size=3)), 3))  # one epoch
    # A class with one readable image trains (on that image).
    Image.new("RGB", (12, 16)).save(tmp_path / "one" / "3.png")
    batches = list(itertools.islice(iter(_train(split + [Example(str(tmp_path / "one" / "3.png"), 1)],
                                                global_batch_size=5)), 2))
    assert 1 in np.concatenate([batch["label"] for batch in batches])


def test_num_eval_batches_rounds_up():
    assert pipeline.num_eval_batches(8, 4) == 2
    assert pipeline.num_eval_batches(9, 4) == 3


def test_eval_is_one_pass_in_order_with_padded_last_batch(examples):
    batches = list(_eval(examples[:10]))

    assert len(batches) == pipeline.num_eval_batches(10, 4) == 3
    assert all(b["image"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) for b in batches)
    labels = np.concatenate([b["label"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.dtype == np.float32
    assert valid.tolist() == [1.0] * 10 + [0.0] * 2
    assert labels[:10].tolist() == list(range(10))
    assert (batches[-1]["image"][2:] == 0).all()


def test_eval_is_deterministic(examples):
    _assert_same_batches(list(_eval(examples)), list(_eval(examples)))


def test_eval_processes_get_equal_batch_counts_covering_all_examples(examples):
    per_process = [
        list(_eval(examples[:9], global_batch_size=4, process_index=i, process_count=2))
        for i in range(2)
    ]

    assert [len(b) for b in per_process] == [3, 3]  # ceil(9 / 4) batches each, in lockstep.
    assert all(b["image"].shape[0] == 2 for batches in per_process for b in batches)
    seen = [
        int(label)
        for batches in per_process
        for b in batches
        for label, valid in zip(b["label"], b["valid"])
        if valid
    ]
    assert sorted(seen) == list(range(9))


def test_transport_benchmark_moves_batches_of_both_dtypes_through_a_worker(capsys):
    from gmae_jax.bench import pipeline_benchmark  # noqa: PLC0415 (the benchmark module, only here)

    rates = pipeline_benchmark.run_transport_benchmark(image_size=16, batch_size=4, num_workers=1, num_batches=4,
                                                       repeats=1)

    assert set(rates) == {"float32", "uint8"} and min(rates.values()) > 0
    table = capsys.readouterr().out
    assert "batches of 4 x 16 px from 1 grain worker(s) to the trainer" in table
    assert re.search(r"^float32 +[\d.]+ +1\.00$", table, re.M) and re.search(r"^uint8 +[\d.]+ +[\d.]+$", table, re.M)


def test_view_benchmark_counts_the_colour_jitter_the_step_now_does(capsys):
    from gmae_jax.bench import pipeline_benchmark  # noqa: PLC0415 (the benchmark module, only here)

    rates = pipeline_benchmark.run_view_benchmark(num_images=2, image_size=32, crop_scale_min=0.35, repeats=1)

    records, with_jitter = rates["gmae_jax ArrayRecord: 256 px records"], rates["  + its colour jitter in XLA:CPU"]
    assert 0 < with_jitter < records
    table = capsys.readouterr().out
    assert re.search(r"leave colour jitter to the train step \([\d.]+ ms per image in XLA:CPU here\)", table)


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 1), (16, 15), (208, input_workers.MAX_AUTO_WORKERS)])
def test_automatic_worker_count_leaves_a_core_to_the_trainer(monkeypatch, cores, expected):
    monkeypatch.setattr(pipeline.os, "sched_getaffinity", lambda pid: set(range(cores)))

    assert input_workers.worker_count(input_workers.AUTO_WORKERS) == expected
    assert input_workers.worker_count(0) == 0 and input_workers.worker_count(3) == 3  # as configured


def test_a_batch_larger_than_the_training_set_repeats_images_and_the_trainer_says_so(examples):
    batch = next(iter(_train(examples, global_batch_size=16)))
    labels = list(batch["label"])
    assert len(labels) == 16 and sorted(set(labels)) == list(range(NUM_EXAMPLES))  # 4 images twice
    message = start_warnings.small_dataset_warning(16, NUM_EXAMPLES)
    assert message == ("config.batch_size=16 is larger than the 12 training images: each batch holds some "
                       "images twice or more (BatchNorm and the loss count them so); use a batch of at most 12, "
                       "or more data")
    assert start_warnings.small_dataset_warning(12, NUM_EXAMPLES) is None


def test_a_run_with_no_steps_left_says_it_only_evaluates():
    assert start_warnings.nothing_to_train_warning(80, 30) == (
        "nothing to train: the run is at step 80, past this config's total of 30; evaluating it as it is "
        "(raise --config.total_steps to train on)")
    assert start_warnings.nothing_to_train_warning(30, 30).startswith("nothing to train: the run is at step 30;")
    assert start_warnings.nothing_to_train_warning(29, 30) is None


def test_grain_s_error_for_a_dead_worker_becomes_one_that_names_the_cause():
    with pytest.raises(input_workers.InputWorkerDiedError, match=r"^an input worker process ended with exit code 3\. "
                       r"If memory ran out, use fewer workers \(--config.data.num_workers, now 2\)"):
        with input_workers.naming_dead_workers(2):
            raise RuntimeError("Worker process was terminated unexpectedly with exit code 3. Search the logs")
    with pytest.raises(RuntimeError, match="^another failure$"):  # every other error passes unchanged
        with input_workers.naming_dead_workers(2):
            raise RuntimeError("another failure")
