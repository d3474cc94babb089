"""Where training records come from: class folders, raw HaGRID v1 / v2, prepared shards, or a TFDS build.

`open_sources(data)` (a `schema.DataConfig`) detects (or takes) the layout under `config.data.root` and returns
the class list and a `Source` per split. A Source is a random-access sequence of pipeline
elements plus how they become pixels, so the grain pipeline is the same for every layout.
"""

from collections.abc import Sequence
import dataclasses
import itertools
import json
from typing import Any, NamedTuple

from absl import logging
from etils import epath

from gmae_jax.data import class_folders, hagrid, hagrid_layout, read_report, record_filters, records, splits, views
from gmae_jax.data.class_folders import DataLayoutError, Example
from gmae_jax.data.views import Element, ViewConfig
from gmae_jax.schema import DataConfig

LAYOUTS = ("auto", "class_folders", "hagrid_v1", "hagrid_v2", "prepared", "tfds")
MODES = views.HAGRID_VIEWS
INDEX_FILE = "index.json"  # written by the prepare stage into each corpus folder
TFDS_NAME = "hagrid_gmae"  # the TFDS builder's dataset (`tfds_hagrid.HagridGmae`): <data_dir>/hagrid_gmae/


@dataclasses.dataclass(frozen=True)
class Source:
    """One split: its records, how they are viewed, and how many unreadable images to tolerate.

    `records` holds Examples, HagridRecords (read from their files) or a ShardReader; the
    pipeline fills in image size and augmentation on `view`.
    """

    records: Sequence[Any]
    view: ViewConfig = ViewConfig()
    max_bad_images: int = DataConfig.max_bad_images

    def __len__(self) -> int:
        return len(self.records)

    @property
    def prepared(self) -> bool:
        """Whether the records are the prepare stage's shards (decoded and resized once already)."""
        return isinstance(self.records, records.ShardReader)

    @property
    def decoded_once(self) -> bool:
        """Whether every image was decoded and resized once already, by the prepare stage or a TFDS
        build: its images are small, and its per-class counts come with it (`records.class_counts`)."""
        return getattr(self.records, "decoded_once", False)

    def __getitem__(self, index: int) -> Element:
        item = self.records[index]
        return (item, None) if isinstance(item, hagrid.HagridRecord) else item


class Splits(NamedTuple):
    """What `open_sources` returns: the class order and the train and evaluation sources."""

    class_names: list[str]
    train: Source
    eval: Source


def detect_layout(root: epath.PathLike, split: str = "train") -> str:
    """'prepared' when root holds a prepare-stage index, 'tfds' a TFDS build of HaGRID, else what
    `hagrid_layout.detect_layout` says; a root with only the `split` class folder (evaluating without the
    training images) is class folders."""
    if (epath.Path(root) / INDEX_FILE).exists():
        return "prepared"
    if (epath.Path(root) / TFDS_NAME).is_dir():
        return "tfds"
    for data_dir in (epath.Path(root).parent, epath.Path(root).parent.parent):  # root: the build or a version of it
        if (data_dir / TFDS_NAME).is_dir() and TFDS_NAME in epath.Path(root).parts:
            raise DataLayoutError(f"{root} is a part of the TFDS build in {data_dir}; point the root at its data_dir: "
                                  f"--config.data.root={data_dir}")
    try:
        return hagrid_layout.detect_layout(root)
    except hagrid_layout.UnknownLayoutError as error:
        if (epath.Path(root) / split).is_dir():
            return "class_folders"
        raise hagrid_layout.UnknownLayoutError(
            f"{error} Or shards of the prepare stage (<root>/{INDEX_FILE}).{_nearby(epath.Path(root))}") from None


def layouts_nearby(root: epath.Path, max_folders: int = 64) -> list[epath.Path]:
    """The folders one level off `root` that have a layout: the one above it, its grandparent when that
    is a v2 tree (root: a class folder of hagrid_dataset/), or ones inside it (root: a prepare workdir
    instead of its corpora, a folder of datasets)."""
    inside = sorted(child for child in itertools.islice(root.iterdir(), max_folders)
                    if child.is_dir() and not child.name.startswith("."))
    found = []
    for folder in [root.parent, *inside]:
        if hagrid_layout.is_part_of_a_v2_tree(folder):
            folder = folder.parent
        elif not ((folder / INDEX_FILE).exists() or (folder / TFDS_NAME).is_dir()):
            try:
                hagrid_layout.detect_layout(folder)
            except DataLayoutError:
                continue
        if folder != root and folder not in found:
            found.append(folder)
    return found


def _nearby(root: epath.Path, max_shown: int = 3) -> str:
    """' Did you mean ...?' naming the folders one level off `root` that have a layout (`layouts_nearby`)."""
    found = layouts_nearby(root)
    if not found:
        return ""
    shown = [str(folder) for folder in found[:max_shown]]
    choices = " or ".join([", ".join(shown[:-1]), shown[-1]] if len(shown) > 1 else shown)
    more = f" (or {len(found) - max_shown} more)" if len(found) > max_shown else ""
    return f" Did you mean --config.data.root={choices}{more}?"


def _pick_another_split(data: DataConfig, split: str, found: Sequence[str]) -> str:
    """How to ask for a split that is there, naming the flag that asked for `split`."""
    if split == data.train_split and split != data.eval_split:
        flag = "--config.data.train_split"
    else:  # the evaluate stage's --config.split sets data.eval_split
        flag = "--config.data.eval_split (--config.split when evaluating a checkpoint)"
    return f"set {flag} to one of {sorted(found)}"


def _hagrid_v2(root: str, wanted: Sequence[str], names: Sequence[str]) -> tuple[list, read_report.ReadReport]:
    recs, report = hagrid.read_hagrid_v2(root, splits=sorted(set(wanted)), class_names=names)
    return record_filters.drop_unlabelled(recs, names, report), report


def _hagrid_v1(root: str, wanted: Sequence[str], names: Sequence[str]) -> tuple[list, read_report.ReadReport]:
    """v1 'test' is ann_test; 'train' / 'val' are ann_train_val (or ann_subsample alone), re-split by
    `hagrid_splits`."""
    recs, report = [], read_report.ReadReport()
    if not set(wanted) <= {"train", "val", "test"}:
        raise DataLayoutError(f"HaGRID v1 splits are train, val and test; got {list(wanted)}.")
    for annotation_set, split in (("ann_test", "test"), (hagrid_layout.v1_train_val_set(root), "")):
        if split in wanted or (not split and set(wanted) - {"test"}):
            part, part_report = hagrid.read_hagrid_v1(root, annotation_set, class_names=names)
            recs += part
            report.merge(part_report)
    return record_filters.drop_unlabelled(recs, names, report), report


def hagrid_splits(recs: list, layout: str, wanted: Sequence[str], data: DataConfig) -> dict[str, list]:
    """v2 records carry their split; v1 train_val is re-split by user, as the authors do (per
    config.data.v1_val_fraction and split_seed: training and the TFDS builder split alike)."""
    if layout == "hagrid_v2":
        return {s: [r for r in recs if r.split == s] for s in wanted}
    result = {"test": [r for r in recs if r.split == "test"]}
    if set(wanted) - {"test"}:
        val = data.v1_val_fraction
        result |= splits.split_by_user([r for r in recs if r.split != "test"], {"train": 1 - val, "val": val},
                                       seed=data.split_seed, stratify_by=record_filters.gesture_name)
    return {s: result[s] for s in wanted}


def _check_free_hands_have_a_class(data: DataConfig, names: Sequence[str]) -> None:
    if data.mode == "hand_crop" and data.no_gesture_prob > 0 and hagrid_layout.NO_GESTURE not in names:
        raise DataLayoutError(
            f"config.data.no_gesture_prob={data.no_gesture_prob} crops free hands as "
            f"'{hagrid_layout.NO_GESTURE}', which is not among the classes {list(names)}; add it to "
            "config.data.classes or set no_gesture_prob=0.")


def _hagrid(data: DataConfig, layout: str, wanted: Sequence[str],
            class_names: Sequence[str] | None) -> tuple[list[str], dict[str, list]]:
    """Class names (a run's, else per config.data.classes) and the records of each wanted split;
    stops with the counts when more than config.data.max_dropped_fraction of the images would be lost."""
    root = str(data.root)
    names = list(class_names) if class_names else hagrid_layout.resolve_classes(data.classes, layout, root)
    _check_free_hands_have_a_class(data, names)
    read = _hagrid_v2 if layout == "hagrid_v2" else _hagrid_v1
    try:
        recs, report = read(root, wanted, names)
    except hagrid.MissingSplitsError as error:  # one line naming the flag that asked for the split
        split = next(s for s in wanted if s in error.missing)
        raise DataLayoutError(f"{error.ann_root} has no {split}/ annotation folder; add it, or "
                              f"{_pick_another_split(data, split, error.present)}.") from None
    logging.info("%s: %d images kept, of %d of the %d classes; dropped: %s", root, report.num_records,
                 len({record_filters.gesture_name(r) for r in recs}), len(names), report.describe_dropped())
    report.check_dropped(data.max_dropped_fraction, root, run_classes=list(class_names or ()),
                         chosen_classes=hagrid_layout.is_class_list(data.classes))
    by_split = hagrid_splits(recs, layout, wanted, data)
    try:
        splits.assert_user_disjoint(by_split)
    except splits.UserOverlapError as error:  # HaGRID's own splits never share a person; a tree edited since may
        logging.warning("%s %s's splits share people, so the evaluation scores some people the model trained on; "
                        "the prepare stage splits a tree by person", error, root)
    return names, by_split


def _prepared(root: epath.Path, wanted: Sequence[str], data: DataConfig) -> tuple[list[str], dict]:
    index_file = root / INDEX_FILE
    if not index_file.exists():
        raise DataLayoutError(f"{root} has no {INDEX_FILE}: config.data.layout=prepared reads a corpus the "
                              "prepare stage wrote (its <workdir>/pretrain or <workdir>/finetune); for other "
                              "data leave config.data.layout=auto")
    try:
        if not class_folders.is_regular_file(index_file):
            raise ValueError("it is no regular file: a folder, a pipe or a link to nothing")
        index = json.loads(index_file.read_text())
        if not (isinstance(index, dict) and {"view", "class_names", "splits"} <= set(index)):
            raise ValueError("not a prepared corpus's index: it lacks view, class_names or splits")
    except (ValueError, OSError) as error:
        raise DataLayoutError(f"{index_file} is damaged ({error}): rerun the prepare stage that wrote it (the same "
                              "command writes it again)") from None
    if index["view"] == "hand_crop" and data.mode != "hand_crop":
        raise DataLayoutError(
            f"{root} holds hand crops; set --config.data.mode=hand_crop to train on them "
            "(or prepare full frames with --config.view=full_frame).")
    _check_free_hands_have_a_class(data, index["class_names"])
    if data.classes not in (DataConfig.classes, ",".join(index["class_names"])):
        raise DataLayoutError(
            f"config.data.classes={data.classes!r} does not apply to {root}: the prepare stage fixed its "
            f"{len(index['class_names'])} classes ({', '.join(index['class_names'][:5])}"
            f"{', ...' if len(index['class_names']) > 5 else ''}); leave config.data.classes out, or prepare "
            f"with --config.data.classes={data.classes}")
    stored_scale = index.get("crop_scale_max", data.crop_scale_max)  # older indexes lack it
    if index["view"] == "hand_crop" and data.crop_scale_max > stored_scale:
        raise DataLayoutError(
            f"{root} holds hand crops stored at {stored_scale} x the gesture box, smaller than training crops "
            f"of up to config.data.crop_scale_max={data.crop_scale_max} x: set --config.data.crop_scale_max="
            f"{stored_scale} (or less), or prepare with --config.crop_scale_max={data.crop_scale_max}")
    result = {}
    for split in wanted:
        if split not in index["splits"]:
            raise DataLayoutError(f"{root} has no split {split!r}; "
                                  f"{_pick_another_split(data, split, index['splits'])}.")
        shards = [root / name for name in index["splits"][split]["shards"]]
        if not shards:
            raise DataLayoutError(f"Split {split!r} of {root} holds no images.")
        result[split] = records.ShardReader(shards, index["splits"][split].get("class_counts"))
        written = index["splits"][split].get("count")
        if written is not None and len(result[split]) != written:
            raise DataLayoutError(f"Split {split!r} of {root} holds {len(result[split])} records where the prepare "
                                  f"stage wrote {written}: its shards were replaced since; rerun the prepare stage "
                                  "that wrote them (or copy the corpus again)")
    return index["class_names"], result


def _tfds(data: DataConfig, wanted: Sequence[str],
          class_names: Sequence[str] | None) -> tuple[list[str], dict[str, Sequence]]:
    """Class names (a run's, else per config.data.classes, from the build's class counts) and a reader
    per wanted split of the TFDS build in data.root. A build is read whole: classes that leave some of
    its images without a label are refused (the prepare stage writes a corpus of fewer classes)."""
    root = str(data.root)
    try:
        from gmae_jax.data import tfds_hagrid  # tensorflow-datasets: the [tfds] extra
    except ImportError as error:
        raise DataLayoutError(f"{root} holds a TFDS build of HaGRID ({TFDS_NAME}/); reading it needs "
                              f"tensorflow-datasets: pip install -e '.[tfds]' ({error})") from None
    build = tfds_hagrid.read_build(root)
    for split in wanted:
        if split not in build.class_counts:
            raise DataLayoutError(f"The TFDS build in {root} has no split {split!r}; "
                                  f"{_pick_another_split(data, split, build.class_counts)}.")
    found = {name for split in build.class_counts.values() for name in split}
    if class_names:
        names = list(class_names)
    elif data.classes == hagrid_layout.PRESENT:
        names = hagrid_layout.in_label_order(found)
    elif data.classes == hagrid_layout.OFFICIAL:
        names = hagrid_layout.resolve_classes(data.classes, build.layout, root)
    else:
        names = hagrid_layout.parse_class_list(data.classes)
    _check_free_hands_have_a_class(data, names)
    for split in wanted:
        unlabelled = sorted(set(build.class_counts[split]) - set(names))
        if unlabelled:
            count = sum(build.class_counts[split][name] for name in unlabelled)
            remedy = ("the run was not trained on them: evaluate it on data of its classes" if class_names else
                      "a build is read whole: leave config.data.classes out (or set it to present), or prepare "
                      "a corpus of these classes from the HaGRID tree (configs/prepare.py with "
                      "--config.data.classes=...)")
            raise DataLayoutError(f"Split {split!r} of the TFDS build in {root} holds {count} images of "
                                  f"{', '.join(unlabelled)}, which are not among the classes {names}; {remedy}")
    return names, {split: tfds_hagrid.TfdsReader(root, split, build.class_counts[split]) for split in wanted}


def _open(
    data: DataConfig, wanted: Sequence[str], class_names: Sequence[str] | None,
) -> tuple[list[str], dict[str, Source]]:
    """Class names and a Source per split in `wanted`; `class_names` (a run's classes.json) fixes
    the class-folder order, else it is the sorted folders of the first wanted split."""
    root, mode, layout = str(data.root), data.mode, data.layout
    if layout not in LAYOUTS:
        raise DataLayoutError(f"config.data.layout={layout!r} must be one of {LAYOUTS}")
    if mode not in MODES:
        raise DataLayoutError(f"config.data.mode={mode!r} must be one of {MODES}")
    layout = detect_layout(root, wanted[0]) if layout == "auto" else layout
    if layout == "class_folders":
        if mode == "hand_crop":
            raise DataLayoutError(f"{root} holds class folders without hand boxes; "
                                  "config.data.mode=hand_crop needs a HaGRID layout.")
        if not class_names and data.classes not in (hagrid_layout.OFFICIAL, hagrid_layout.PRESENT):
            raise DataLayoutError(f"config.data.classes={data.classes!r} chooses classes of HaGRID layouts; {root} "
                                  f"holds class folders, each folder under {root}/{wanted[0]} a class: leave "
                                  "config.data.classes out, and move the folders of classes not to train on elsewhere")
        names = list(class_names) if class_names else class_folders.list_classes(root, wanted[0])
        # Training needs images of every class; an evaluation split may lack some (it has none of them).
        parts: dict[str, Sequence] = {s: class_folders.scan_split(root, s, names, complete=s == data.train_split)
                                      for s in wanted}
        view = ViewConfig()  # the original G-MAE views
    else:
        if layout == "prepared":
            names, parts = _prepared(epath.Path(root), wanted, data)
        elif layout == "tfds":
            names, parts = _tfds(data, wanted, class_names)
        else:
            names, parts = _hagrid(data, layout, wanted, class_names)
        if class_names and list(class_names) != list(names):
            raise DataLayoutError(
                f"{root} ({layout}) has the classes {names}, not the run's {list(class_names)}: a {layout} set keeps "
                "the class list (and label order) it was built with. Evaluate on the HaGRID tree it was built from "
                "(--config.data_root=THAT_TREE --config.split=val or test: images of gestures the run has no class "
                "for are left out there), or prepare it again with --config.data.classes set to the run's classes, "
                "in their order (with --config.rebuild=True, or into a new --workdir)")
        view = ViewConfig(mode=mode, class_names=tuple(names),
                          crop_scale_max=data.crop_scale_max, no_gesture_prob=data.no_gesture_prob)
    for split, part in parts.items():
        if not len(part):
            raise DataLayoutError(f"Split {split!r} of {root} ({layout}) holds no usable images."
                                  f"{hagrid_layout.why_no_images(root, layout)}")
    logging.info("data %s (%s, %s): %d classes, %s images", root, layout, view.mode, len(names),
                 " / ".join(f"{len(parts[s])} {s}" for s in wanted))
    return list(names), {s: Source(parts[s], view, data.max_bad_images) for s in wanted}


def open_sources(data: DataConfig) -> Splits:
    """(class names, train source, eval source) of `data.root`, per `data.layout` and `data.mode`.

    Class-folder labels index the sorted folders; HaGRID labels index the fixed v1 / v2 class
    lists, so a label means the same class in every run and checkpoint.
    """
    names, parts = _open(data, (data.train_split, data.eval_split), None)
    return Splits(names, parts[data.train_split], parts[data.eval_split])


def open_split(data: DataConfig, split: str, class_names: Sequence[str]) -> Source:
    """One split labelled by a trained run's `class_names`, without touching any other split (for
    evaluating a checkpoint on data whose training images are elsewhere or gone)."""
    return _open(data, (split,), class_names)[1][split]


def as_source(examples: Source | Sequence[Example]) -> Source:
    """A Source as is; a plain list of class-folder Examples with the original views."""
    return examples if isinstance(examples, Source) else Source(list(examples))
