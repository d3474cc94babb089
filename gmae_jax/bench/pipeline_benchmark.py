"""The input pipeline's speed: how fast one worker makes training views, and how fast batches
travel from grain's worker processes to the trainer (`python -m gmae_jax.bench --pipeline`).

Training images/s of one worker (one core) for three ways to get an augmented 224 px view, all with
the same random resized crop, flip and colour jitter:
  1. the original G-MAE: full-resolution decode, then the PIL transforms and normalisation;
  2. our file path: JPEG draft-mode decode at the smallest size the crop needs, uint8 out
     (standardised on the device, in the step);
  3. our ArrayRecord path: records from the prepare stage (frames pre-resized to 256 px).
Then the batches' way from the worker processes to the trainer, ready-made views of both dtypes
(float32: standardised on the host, as before; uint8: what the workers hand on now).
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable, Sequence

from array_record.python import array_record_module
import grain
import jax
import numpy as np
from PIL import Image

from gmae_jax import schema
from gmae_jax.data import device_jitter, input_workers, prepare, records, transforms, views
from gmae_jax.data.class_folders import Example
from gmae_jax.data.hagrid import HagridRecord


def write_full_hd_jpegs(folder: str, count: int, seed: int = 0) -> list[str]:
    """Camera-like 1920x1080 JPEGs (smooth shading plus sensor noise, quality 95)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, 1920)[None, :, None]
    y = np.linspace(0, 1, 1080)[:, None, None]
    paths = []
    for i in range(count):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = 127 + 100 * np.sin(6 * x + 4 * y + phase)
        pixels = np.clip(base + rng.normal(0, 6, (1080, 1920, 3)), 0, 255).astype(np.uint8)
        path = f"{folder}/{i:04d}.jpg"
        Image.fromarray(pixels).save(path, "JPEG", quality=95)
        paths.append(path)
    return paths


def _original_view(path: str, view: views.ViewConfig, rng: np.random.Generator) -> np.ndarray:
    """torchvision-style: decode the whole frame, then RandomResizedCrop, flip, ColorJitter."""
    img = Image.open(path).convert("RGB")
    img = transforms.random_resized_crop(img, view.image_size, rng, scale=(view.crop_scale_min, 1.0))
    img = transforms.horizontal_flip(img, rng)
    jitter = transforms.sample_color_jitter(rng, view.brightness, view.contrast, view.saturation, view.hue)
    return transforms.normalize(transforms.apply_color_jitter(img, jitter))


def _write_shard(paths: Sequence[str], shard: str) -> records.ShardReader:
    """The prepare stage's full-frame records of `paths`, in one ArrayRecord file."""
    writer = array_record_module.ArrayRecordWriter(shard, "group_size:1")
    for path in paths:
        record = HagridRecord("x", path, "palm", "u", ((0.4, 0.4, 0.1, 0.2),), ("palm",))
        writer.write(records.encode(*prepare.store_image(record, schema.StoreView())))
    writer.close()
    return records.ShardReader([shard])


def _images_per_second(fn: Callable[[int], object], count: int, repeats: int) -> float:
    fn(0)  # warm up caches and lazy imports
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            fn(i)
        best = min(best, time.perf_counter() - start)
    return count / best


def device_jitter_seconds_per_image(image_size: int, repeats: int, batch_size: int = 32) -> float:
    """Seconds per image of the train step's colour jitter (`device_jitter`) on the default device,
    jitted alone on a batch at the default strengths; best of `repeats`."""
    rng = np.random.default_rng(0)
    images = jax.device_put(rng.integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8))
    jitters = jax.device_put(np.stack([transforms.sample_color_jitter(rng, 0.4, 0.4, 0.4, 0.1)
                                       for _ in range(batch_size)]))
    jitter = jax.jit(device_jitter.color_jitter)
    batches_per_second = _images_per_second(lambda _: jitter(images, jitters).block_until_ready(), 1, repeats)
    return 1 / (batches_per_second * batch_size)


def run_view_benchmark(num_images: int, image_size: int, crop_scale_min: float, repeats: int) -> dict:
    """images/s per worker for the three paths, and for the last with the step's colour jitter run on
    this CPU too (what a run without an accelerator gets); also printed as a table."""
    view = views.ViewConfig(image_size=image_size, crop_scale_min=crop_scale_min, class_names=("palm",))
    with tempfile.TemporaryDirectory() as folder:
        paths = write_full_hd_jpegs(folder, num_images)
        mean_kb = np.mean([os.path.getsize(p) for p in paths]) / 1024
        shard = _write_shard(paths, f"{folder}/bench.array_record")
        rng = lambda i: np.random.default_rng(i)  # noqa: E731 (same draws on every path)
        results = {
            "original: full decode + PIL transforms": _images_per_second(
                lambda i: _original_view(paths[i], view, rng(i)), num_images, repeats),
            "gmae_jax files: draft-mode decode": _images_per_second(
                lambda i: views.train_view(Example(paths[i], 0), view, rng(i)), num_images, repeats),
            "gmae_jax ArrayRecord: 256 px records": _images_per_second(
                lambda i: views.train_view(shard[i], view, rng(i)), num_images, repeats),
        }  # fmt: skip
    jitter_s, backend = device_jitter_seconds_per_image(image_size, repeats), jax.default_backend().upper()
    records_rate = results["gmae_jax ArrayRecord: 256 px records"]
    results[f"  + its colour jitter in XLA:{backend}"] = 1 / (1 / records_rate + jitter_s)
    base = next(iter(results.values()))
    print(f"{num_images} full-HD JPEGs ({mean_kb:.0f} KB each) -> {image_size} px training views, "
          f"crop_scale_min={crop_scale_min}; gmae_jax's views leave colour jitter to the train step "
          f"({jitter_s * 1e3:.2f} ms per image in XLA:{backend} here)")
    print(f"{'path':40s} {'images/s/worker':>16s} {'x original':>11s}")
    for name, rate in results.items():
        print(f"{name:40s} {rate:16.1f} {rate / base:11.2f}")
    return results


@dataclasses.dataclass(frozen=True)
class _ReadyView(grain.transforms.Map):
    """A finished view of one dtype: the transport's share of the pipeline without the work before it."""

    image_size: int
    dtype: str

    def map(self, index: int) -> dict[str, np.ndarray]:
        return {"image": np.full((self.image_size, self.image_size, 3), index % 251, self.dtype),
                "label": np.int32(index)}


def run_transport_benchmark(image_size: int, batch_size: int, num_workers: int, num_batches: int = 100,
                            repeats: int = 2) -> dict[str, float]:
    """images/s of batches reaching the trainer from grain's worker processes, float32 vs uint8 pixels
    (alternating, best of `repeats`); also printed. Workers start in each pass: run it under a
    `__main__` guard."""
    rates: dict[str, float] = {"float32": 0.0, "uint8": 0.0}
    for _ in range(repeats):
        for dtype in rates:
            ds = grain.MapDataset.range(num_batches * batch_size).map(_ReadyView(image_size, dtype))
            batches = iter(input_workers.to_iter_dataset(ds.batch(batch_size, drop_remainder=True), num_workers))
            next(batches)  # workers started and running
            start, count = time.perf_counter(), 0
            for batch in batches:
                count += len(batch["label"])
            rates[dtype] = max(rates[dtype], count / (time.perf_counter() - start))
    print(f"batches of {batch_size} x {image_size} px from {num_workers} grain worker(s) to the trainer")
    print(f"{'pixels':40s} {'images/s':>16s} {'x float32':>11s}")
    for dtype, rate in rates.items():
        print(f"{dtype:40s} {rate:16.1f} {rate / rates['float32']:11.2f}")
    return rates
