"""The prepare stage: a raw HaGRID tree -> checked, de-duplicated, user-split ArrayRecord corpora.

  python -m gmae_jax.main --config=configs/prepare.py --workdir=data/hagrid_prepared \
      --config.data.root=/data/hagrid

Writes `<workdir>/{pretrain,finetune}/<split>/*.array_record` with an `index.json` per corpus
(what `config.data.layout='prepared'` reads), `<workdir>/manifest.json` (counts per class and
split, the class list, every skipped file and why) and optionally the original's class folders.
HaGRID's official test split stays out of the corpora (config.include_official_test).
Every step that decodes runs on all cores; a killed run resumes without redoing finished
shards (each is written under a temporary name and renamed when complete) or the checks of
images unchanged since (same size and modification time).
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import os
from typing import Any

from absl import logging
from array_record.python import array_record_module
from etils import epath
import ml_collections
from PIL import Image

from gmae_jax import host_resources, run_files
from gmae_jax.data import (crops, frames, hagrid, hagrid_layout, read_report, record_filters, records, sources, splits,
                           transforms, views, worker_pool)
from gmae_jax.data.class_folders import DataLayoutError
from gmae_jax.schema import StoreView

VIEWS = views.HAGRID_VIEWS
_CHECKED = "checked.jsonl"  # one line per decode-checked image: resuming skips them
_PLAN = "plan.json"
_MANIFEST = "manifest.json"
_STAT_THREADS = 32  # stat calls in flight when comparing images with their cached checks


def _check(path: str) -> tuple[str, str | None, str | None]:
    """(path, sha256 of the file, None) or (path, None, why it does not decode)."""
    try:
        data = epath.Path(path).read_bytes()
        transforms.decode_rgb(data)  # a full decode: the only way to catch truncated JPEGs
    except (OSError, transforms.ImageDecodeError) as e:
        return path, None, str(e).replace("<bytes>", path)
    return path, hashlib.sha256(data).hexdigest(), None


def _relative_box(box: hagrid.Box, left: int, top: int, side: int, w: int, h: int) -> hagrid.Box:
    """A box of the w x h frame, relative to the crop of `side` pixels at (left, top) (it may reach
    outside the crop's [0, 1]^2)."""
    return ((box[0] * w - left) / side, (box[1] * h - top) / side, box[2] * w / side, box[3] * h / side)


def _whole_inside(box: hagrid.Box) -> bool:
    """Whether a relative box lies whole inside [0, 1]^2."""
    x, y, w, h = box
    return x >= 0 and y >= 0 and x + w <= 1 and y + h <= 1


def store_image(record: hagrid.HagridRecord, store: StoreView) -> tuple[hagrid.HagridRecord, bytes]:
    """The record (boxes relative to the stored image) and the JPEG bytes a shard keeps for it."""
    if store.view == "full_frame":
        img = transforms.decode_rgb(record.path, draft_size=store.image_side)
        scale = store.image_side / min(img.size)
        if scale < 1:  # never upscale: a small source stays small
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.Resampling.BILINEAR)
    else:
        box = crops.gesture_box(record)
        draft = math.ceil(store.crop_size / (max(box[2], box[3]) * store.crop_scale_max))
        full = transforms.decode_rgb(record.path, draft_size=draft)
        left, top, side = frames.hand_crop_box(box, *full.size, store.crop_scale_max)
        img = crops.crop_square(full, left, top, side, store.crop_size)
        moved = [(_relative_box(b, left, top, side, *full.size), l) for b, l in zip(record.boxes, record.labels)]
        # A free hand the crop cuts would be trained as a no_gesture crop of a fragment of a hand.
        clipped = [(hagrid.clip_box(b), l) for b, l in moved if l != hagrid_layout.NO_GESTURE or _whole_inside(b)]
        kept = [(b, l) for b, l in clipped if b is not None]
        united = record.united_box and hagrid.clip_box(_relative_box(record.united_box, left, top, side, *full.size))
        boxes, labels = (tuple(c) for c in zip(*kept))  # the gesture box is inside: never empty
        record = dataclasses.replace(record, boxes=boxes, labels=labels, united_box=united)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=store.jpeg_quality)
    return record, out.getvalue()


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    path: str  # final shard path; written to path + '.tmp' first
    records: tuple[hagrid.HagridRecord, ...]
    store: StoreView
    folders_dir: str  # '' or <workdir>/class_folders/<corpus>_dataset/<split>


def _write_shard(task: _ShardTask) -> str:
    """Writes one shard (and its class-folder copies); the rename makes it count as done."""
    tmp = task.path + ".tmp"
    writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
    for record in task.records:
        stored, jpeg = store_image(record, task.store)
        writer.write(records.encode(stored, jpeg))
        if task.folders_dir:
            folder = epath.Path(task.folders_dir) / record_filters.gesture_name(record)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{record.image_id}.jpg").write_bytes(jpeg)
    writer.close()
    os.replace(tmp, task.path)
    return task.path


def _written(task: _ShardTask) -> bool:
    """The shard is there whole (it opens and holds its records), and so are its class-folder copies
    if asked for (a rerun that adds config.class_folders=True rewrites the shards, the same bytes,
    with their copies)."""
    if not epath.Path(task.path).exists():
        return False
    try:
        count = records.count_records(task.path)
    except records.ShardError as error:
        logging.warning("writing %s again: it cannot be read (%s)", task.path, error.why)
        return False
    if count != len(task.records):
        logging.warning("writing %s again: it holds %d records, not %d", task.path, count, len(task.records))
        return False
    return not task.folders_dir or all(
        (epath.Path(task.folders_dir) / record_filters.gesture_name(r) / f"{r.image_id}.jpg").exists()
        for r in task.records)


def _refuse_own_output(root: epath.Path) -> None:
    """The stage's output (a workdir, or one of its corpora) given as its input is refused, naming the
    raw tree it was prepared from where the manifest says."""
    if (root / _PLAN).exists():
        manifest = root / _MANIFEST
    elif (root / sources.INDEX_FILE).exists():
        manifest = root.parent / _MANIFEST
    else:
        return
    source = f" ({json.loads(manifest.read_text())['source']}, per {manifest})" if manifest.exists() else ""
    raise DataLayoutError(f"{root} holds shards the prepare stage wrote; point --config.data.root at the raw "
                          f"HaGRID tree they were prepared from{source}.")


def _official_test(root: str, layout: str) -> str | None:
    """The annotation folder of HaGRID's official test split in `root`, if it has one."""
    folder = epath.Path(root) / ("hagrid_annotations/test" if layout == "hagrid_v2" else "ann_test")
    return str(folder) if folder.is_dir() else None


def _read(
    root: str, layout: str, classes: str, official_test: bool = False,
) -> tuple[list[hagrid.HagridRecord], list[str], read_report.ReadReport]:
    """The labelled records of the tree, the class list (per config.data.classes), the report. HaGRID's
    official test split is left out unless `official_test`: its people must not be trained on, so that
    runs prepared here can be scored on it like published results."""
    _refuse_own_output(epath.Path(root))
    layout = sources.detect_layout(root) if layout == "auto" else layout  # hints at a root one level off
    if layout == "tfds":
        raise DataLayoutError(f"{root} holds a TFDS build of HaGRID, split by person and resized already: train on "
                              f"it as it is (--config.data.root={root} in pretrain or finetune)")
    if layout not in ("hagrid_v1", "hagrid_v2"):
        raise DataLayoutError(f"{root} is laid out as {layout}; the prepare stage splits by person "
                              "and needs HaGRID v1 or v2 annotations (user_id).")
    class_names = hagrid_layout.resolve_classes(classes, layout, root)
    test_folder = _official_test(root, layout)
    if test_folder and not official_test:
        logging.info("%s (HaGRID's official test split) is kept out of the corpora, so that runs prepared here can "
                     "be scored on it: configs/evaluate.py --config.data_root=%s --config.split=test "
                     "(--config.include_official_test=True prepares it too)", test_folder, root)
    if layout == "hagrid_v2":
        ann_root = epath.Path(root) / "hagrid_annotations"
        splits_read = None if official_test else [s for s in hagrid_layout.V2_SPLITS
                                                  if s != "test" and (ann_root / s).is_dir()]
        if splits_read == []:
            raise DataLayoutError(f"{ann_root} annotates HaGRID's official test split only, which the prepare stage "
                                  "keeps out of the corpora; add the train / val annotations, or prepare the test "
                                  "split with --config.include_official_test=True")
        recs, report = hagrid.read_hagrid_v2(root, splits_read, class_names=class_names)
    else:
        recs, report = hagrid.read_hagrid_v1(root, hagrid_layout.v1_train_val_set(root), class_names=class_names)
        if test_folder and official_test:
            test, test_report = hagrid.read_hagrid_v1(root, "ann_test", class_names=class_names)
            recs += test
            report.merge(test_report)
    recs = record_filters.drop_unlabelled(recs, class_names, report)
    if not recs:
        raise DataLayoutError(f"{root} ({layout}) holds no usable images.{hagrid_layout.why_no_images(root, layout)}")
    return recs, class_names, report


def _stamp(path: str) -> list[int] | None:
    """[size, mtime] of an image (None if it cannot be read): its decode check is reused only while
    both stay the same, so a file replaced after a run (repaired, re-extracted, cut short) is checked
    again."""
    try:
        if "://" in path:  # an object store: etils reports whole seconds
            stat = epath.Path(path).stat()
            return [stat.length, stat.mtime]
        stat = os.stat(path)
    except OSError:
        return None  # never reused: the check itself reports why the file cannot be read
    return [stat.st_size, stat.st_mtime_ns]


def _checked(records_: list[hagrid.HagridRecord], workdir: epath.Path, num_workers: int) -> dict:
    """path -> (sha256, error) for every image, reusing the results of an earlier run for files
    unchanged since. Images that failed are checked again: the stage's error tells the user to fix
    them and rerun."""
    log = workdir / _CHECKED
    paths = sorted({r.path for r in records_})
    with concurrent.futures.ThreadPoolExecutor(_STAT_THREADS) as pool:  # I/O bound: threads suffice
        stamps = dict(zip(paths, pool.map(_stamp, paths)))
    done = {}
    if log.exists():
        for line in log.read_text().splitlines():  # in order: a later line (a re-check) wins
            try:
                path, stamp, digest, error = json.loads(line)
            except ValueError:  # the cut last line of a killed run, or an older format: check again
                continue
            if error is None and stamp is not None and stamps.get(path) == stamp:
                done[path] = (digest, error)
            else:
                done.pop(path, None)
    todo = [path for path in paths if path not in done]
    with log.open("a") as f:
        for path, digest, error in worker_pool.unordered_map(_check, todo, num_workers, "decode-check"):
            f.write(json.dumps([path, stamps[path], digest, error]) + "\n")
            done[path] = (digest, error)
    return done


def _settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config fields that decide what the shards hold (not how many workers write them)."""
    flat = {"seed": config.seed, "records_per_shard": config.records_per_shard,
            "include_official_test": config.include_official_test,
            **{f"data.{k}": v for k, v in config.data.to_dict().items()},
            **{f"corpora.{k}": v for k, v in config.corpora.to_dict().items()},
            **{f"splits.{k}": v for k, v in config.splits.to_dict().items()},
            **{name: config[name] for name in StoreView.__dataclass_fields__}}
    return json.loads(json.dumps(flat))  # as plan.json reads back (tuples as lists)


def _check_same_plan(saved: dict[str, Any], plan: str, settings: dict[str, Any], out: epath.Path,
                     rebuild: bool) -> None:
    """A workdir's shards are one preparation's: a rerun with other settings or data is refused, naming
    what differs, unless `rebuild` asks for that preparation's output to be replaced."""
    if saved["plan"] == plan:
        return
    old = saved.get("settings")
    if old is None:  # written before plan.json kept the settings
        what = "other data or settings"
    else:
        changed = [f"{name}: {old.get(name)!r} -> {settings.get(name)!r}"
                   for name in sorted(set(old) | set(settings)) if old.get(name) != settings.get(name)]
        what = "; ".join(changed) if changed else "the same settings, but the images or annotations changed since"
    if not rebuild:
        # Where only the data changed, its old settings would not bring back the old shards.
        same_settings = "" if old is not None and not changed else "rerun with its settings, "
        raise DataLayoutError(f"{out} holds shards of a different preparation ({what}); {same_settings}rewrite them "
                              "here with --config.rebuild=True (the decode checks are kept), or use "
                              "an empty --workdir (the decode checks in checked.jsonl can be copied there)")
    logging.warning("%s holds shards of a different preparation (%s): removing them to prepare anew "
                    "(config.rebuild=True; the decode checks are kept)", out, what)
    for child in out.iterdir():
        if child.is_dir() and (child.name == "class_folders" or (child / sources.INDEX_FILE).exists()):
            child.rmtree()
    for name in (_MANIFEST, _PLAN):
        (out / name).unlink(missing_ok=True)


def _split(recs: list, config: ml_collections.ConfigDict) -> dict[tuple[str, str], list]:
    corpora = splits.split_by_user(recs, dict(config.corpora), config.seed, record_filters.gesture_name)
    parts = {}
    for i, (corpus, part) in enumerate(sorted(corpora.items())):
        by_split = splits.split_by_user(
            part, dict(config.splits), config.seed + 1 + i, record_filters.gesture_name)
        parts |= {(corpus, s): [dataclasses.replace(r, split=s) for r in rs]
                  for s, rs in by_split.items()}
    if empty := [f"{c}/{s}" for (c, s), rs in sorted(parts.items()) if not rs]:
        users = len({r.user_id for r in recs})
        raise DataLayoutError(
            f"{', '.join(empty)} would hold no images: the {users} people of {config.data.root} are too few for "
            f"config.corpora={dict(config.corpora)} and config.splits={dict(config.splits)} (every person stays "
            "on one side); add images of more people, or give each side a larger fraction, e.g. "
            "--config.splits=\"{'train': 0.8, 'val': 0.2}\"")
    splits.assert_user_disjoint({f"{c}/{s}": rs for (c, s), rs in parts.items()})
    return parts


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs the stage; returns the manifest it writes (see the module docstring)."""
    out = epath.Path(workdir)
    num_workers = host_resources.pool_size(config.num_workers)
    store = StoreView(config.view, config.image_side, config.crop_size, config.crop_scale_max,
                      config.jpeg_quality)
    root, max_dropped = str(config.data.root), config.data.max_dropped_fraction
    recs, class_names, report = _read(root, config.data.layout, config.data.classes, config.include_official_test)
    chosen = hagrid_layout.is_class_list(config.data.classes)
    report.check_dropped(max_dropped, root, chosen_classes=chosen)  # before hours of decoding and any writing
    present = {record_filters.gesture_name(r) for r in recs}
    absent = [name for name in class_names if name not in present]
    if absent:
        # `present` counts every class folder, annotated or not: then only the list itself is a way out.
        way_out = (f"--config.data.classes={','.join(n for n in class_names if n not in absent)} prepares the "
                   "classes with images" if config.data.classes == hagrid_layout.PRESENT else
                   "--config.data.classes=present prepares the classes found")
        logging.warning("%d of the %d classes (config.data.classes=%s) have no image in %s: %s%s. A classifier "
                        "fine-tuned on these corpora could never learn them (fine-tuning refuses them); %s",
                        len(absent), len(class_names), config.data.classes, root, ", ".join(absent[:5]),
                        ", ..." if len(absent) > 5 else "", way_out)
    out.mkdir(parents=True, exist_ok=True)

    checked = _checked(recs, out, num_workers)
    first_of: dict[str, hagrid.HagridRecord] = {}
    kept = []
    for r in sorted(recs, key=lambda r: r.path):
        if checked[r.path][1]:
            report.drop("undecodable", r.path, r.class_folder, detail=checked[r.path][1])
            continue
        original = first_of.setdefault(checked[r.path][0], r)
        if original is r:
            kept.append(r)
        else:  # one image annotated twice with other gestures: one of them is wrong, and it is not ours to say
            conflict = (f"; annotated {list(original.labels)} there and {list(r.labels)} here"
                        if original.labels != r.labels else "")
            report.drop("duplicate", r.path, r.class_folder, detail=f"same bytes as {original.path}{conflict}")
    report.num_records = len(kept)
    report.check_dropped(max_dropped, root, chosen_classes=chosen)
    skipped = report.skipped

    parts = _split(kept, config)
    tasks = []
    for (corpus, split), rs in sorted(parts.items()):
        folder = out / corpus / split
        count = math.ceil(len(rs) / config.records_per_shard)
        folders = out / "class_folders" / f"{corpus}_dataset" / split
        folders_dir = str(folders) if config.class_folders else ""
        for i in range(count):
            chunk = tuple(rs[i * config.records_per_shard : (i + 1) * config.records_per_shard])
            path = folder / f"{split}-{i:05d}-of-{count:05d}{records.SHARD_SUFFIX}"
            tasks.append(_ShardTask(str(path), chunk, store, folders_dir))

    # Shards by their place in the workdir, so that a copied or moved workdir is the same preparation.
    plan_items = [dataclasses.asdict(store)] + [[os.path.relpath(t.path, out), [r.path for r in t.records]]
                                                for t in tasks]
    plan = hashlib.sha256(json.dumps(plan_items).encode()).hexdigest()
    settings = _settings(config)
    plan_file = out / _PLAN
    if plan_file.exists():
        recorded = run_files.read_json(plan_file)
        if not (isinstance(recorded, dict) and {"plan", "settings"} <= set(recorded)):
            raise DataLayoutError(f"{plan_file} is damaged (no plan and settings), so what this folder holds is "
                                  "unknown: move it aside and prepare into a new one")
        _check_same_plan(recorded, plan, settings, out, config.rebuild)
    run_files.write_text(plan_file, json.dumps({"plan": plan, "settings": settings}, indent=1, sort_keys=True))
    manifest_then = run_files.read_json(out / _MANIFEST) if (out / _MANIFEST).exists() else None
    earlier = manifest_then.get("class_names") if isinstance(manifest_then, dict) else None  # damaged: rewritten
    if earlier is not None and earlier != class_names:  # the same images: the shards stay, the lists change
        logging.warning("the class list changed (config.data.classes=%s): %d -> %d classes (%s); index.json is "
                        "rewritten, so runs trained on the earlier list no longer evaluate on these corpora",
                        config.data.classes, len(earlier), len(class_names), ", ".join(class_names[:6])
                        + (", ..." if len(class_names) > 6 else ""))
    todo = [t for t in tasks if not _written(t)]
    for folder in sorted({epath.Path(t.path).parent for t in todo}):  # after a rebuild removed the old ones
        folder.mkdir(parents=True, exist_ok=True)
    logging.info("%d of %d shards already written; writing %d",
                 len(tasks) - len(todo), len(tasks), len(todo))
    for _ in worker_pool.unordered_map(_write_shard, todo, num_workers, "shards"):
        pass

    manifest = {"source": str(config.data.root), "view": dataclasses.asdict(store),
                "class_names": class_names, "counts": {}, "shards": sorted(os.path.relpath(t.path, out) for t in tasks),
                "skipped": {k: report.described(k, v) for k, v in skipped.items() if v},
                "dropped_images": {k: dict(v) for k, v in report.dropped_images().items()},
                "repaired": {k: len(v) for k, v in report.repaired.items()}}
    for corpus in sorted({c for c, _ in parts}):
        index = {"class_names": class_names, "view": store.view, "crop_scale_max": store.crop_scale_max,
                 "splits": {}}
        for (c, split), rs in sorted(parts.items()):
            if c == corpus:
                prefix = str(out / corpus / split) + os.sep
                shards = [os.path.relpath(t.path, out / corpus) for t in tasks if t.path.startswith(prefix)]
                per_class = dict(sorted(collections.Counter(record_filters.gesture_name(r) for r in rs).items()))
                index["splits"][split] = {"shards": shards, "count": len(rs), "class_counts": per_class}
                manifest["counts"][f"{corpus}/{split}"] = per_class
        run_files.write_text(out / corpus / sources.INDEX_FILE, json.dumps(index, indent=1))
    run_files.write_text(out / _MANIFEST, json.dumps(manifest, indent=1))
    logging.info("prepared %s: %s; skipped %s%s", out,
                 {k: sum(v.values()) for k, v in manifest["counts"].items()},
                 {k: len(v) for k, v in manifest["skipped"].items()},
                 f" (each file and why: {out / _MANIFEST}, 'skipped')" if manifest["skipped"] else "")
    return manifest
